"""PLACEHOLDER (issue 4 replaces this file): Jacobi and TR-Jacobi greedy decoding."""


def jacobi_generate(model, inputs=None, generation_config=None, **kwargs):
    raise NotImplementedError("jacobi decoding is not implemented yet (issue 4)")


def tr_jacobi_generate(model, inputs=None, generation_config=None, **kwargs):
    raise NotImplementedError("tr_jacobi decoding is not implemented yet (issue 4)")
