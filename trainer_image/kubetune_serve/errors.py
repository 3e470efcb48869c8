"""The one exception of `kubetune serve`: a request refused, with the status and OpenAI error type
the API answers with. Its own module, so that the engine and the adapter sources both raise it."""


class EngineError(Exception):
    """A request the engine refuses: `status` and `type` are what the API answers with."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "BadRequestError",
        reason: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.type, self.param = message, status, type, param
        self.reason = reason  # for a failed load: its `reason` label in the metrics, when not implied by status
