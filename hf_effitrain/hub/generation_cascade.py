"""PLACEHOLDER (issue 6 replaces this file): cascade generation."""


def cascade_generate(model, inputs=None, generation_config=None, **kwargs):
    raise NotImplementedError("cascade generation is not implemented yet (issue 6)")
