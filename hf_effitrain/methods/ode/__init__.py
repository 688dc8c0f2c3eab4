"""ODE-shared models: a shared block run as an ODE solver (the model itself is `hf_effitrain.hub`'s
`OdeSharedForCausalLM`); here, starting one from a pre-trained dense Llama."""

from .conversion import ode_shared_config_from_llama, ode_shared_from_llama

__all__ = ["ode_shared_config_from_llama", "ode_shared_from_llama"]
