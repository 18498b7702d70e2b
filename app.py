"""LAFQ Gradio app: `python app.py` serves on 127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT override)."""
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main():
    import torch

    from demo.state import load_state
    from demo.ui import LAUNCH_OPTIONS, QUEUE_OPTIONS, build_app

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    demo = build_app(load_state())
    demo.queue(**QUEUE_OPTIONS)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), **LAUNCH_OPTIONS)


if __name__ == "__main__":
    main()
