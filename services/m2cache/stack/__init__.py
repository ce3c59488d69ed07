"""The whole stack as local supervised processes (``m2cache up``): configuration
composed from the services' configs (config.py), the processes and their
readiness checks (services.py), a secure stack's secrets (secrets.py), the
running stack (stack.py) and its state file (state.py)."""
from m2cache.stack.config import StackConfig
from m2cache.stack.stack import Stack
from m2cache.stack.state import client_kwargs, pid_alive, read_state, state_security

__all__ = ["Stack", "StackConfig", "client_kwargs", "pid_alive", "read_state", "state_security"]
