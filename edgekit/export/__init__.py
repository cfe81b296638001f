"""Exporters: one module per output format (GGUF for llama.cpp, ONNX for onnxruntime)."""
