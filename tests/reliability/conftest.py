from tests.inference.conftest import tiny_llama  # noqa: F401  (session fixture: a small random HF checkpoint)
