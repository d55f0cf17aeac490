"""The Tinker API served over a local model (`rollouts serve`): `state` holds the models,
samplers and futures; `wire` speaks the protobuf messages; `app` is the HTTP layer."""

from rollouts.serve.state import ServeError, ServerState

__all__ = ["ServeError", "ServerState"]
