"""The weights' forms and the linears that serve them: int8 and 4-bit groups
(``quantization``), a GGUF file's own blocks (``gguf``), integer activations
(``int_activations``) and the float32 layouts chosen by measuring at load
(``layout``). The C++ they call lives in ``model_runtime.kernels``, shared
with attention."""
