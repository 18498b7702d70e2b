"""LAFQ Gradio app: `python app.py` serves on 127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override).

Computes on the GPU where there is one; LAFQ_DEVICE=cpu (or cuda:N) chooses. On a ZeroGPU Space the GPU work
runs in @spaces.GPU calls (demo/zerogpu.py); on CPU Basic it runs as locally.
"""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main():
    from demo import zerogpu  # first: on ZeroGPU, `spaces` must be imported before torch touches CUDA

    from demo.serving import port_from_env

    try:
        port = port_from_env()  # before gradio is imported: it parses GRADIO_SERVER_PORT itself, with a traceback
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    import torch

    from demo.state import load_state
    from demo.ui import LAUNCH_OPTIONS, QUEUE_OPTIONS, build_app, warm_up
    from lafq.data import DataError

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        state = load_state(device=zerogpu.host_device(os.environ.get("LAFQ_DEVICE", "auto")))
    except (ValueError, OSError, DataError) as e:  # bad LAFQ_DEVICE, missing or invalid checkpoint: one line
        raise SystemExit(f"error: {e}") from None
    demo = build_app(state)
    warm_up(state)
    demo.queue(**QUEUE_OPTIONS)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), server_port=port, **LAUNCH_OPTIONS)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading: a line, not a traceback
        raise SystemExit("interrupted") from None
