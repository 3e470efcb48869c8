"""`Rule`: a cross-field rule written once, enforced by the API server (CEL) and by Python alike."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """A cross-field rule written once for two enforcers.

    `cel` is emitted into the CRD as an `x-kubernetes-validations` rule, which the API server
    evaluates at admission; `check` evaluates the same condition in Python so that
    `kubetune validate`, the operator and the trainer reject the same objects offline with the
    same words. A rule without `check` uses `oldSelf` (a transition rule such as immutability)
    and can only be enforced by the API server.
    """

    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    field_path: str | None = None
    # Optional CEL that builds the message from the object, and the Python twin that builds the
    # same text; a cluster test asserts the two agree.
    message_expression: str | None = None
    describe: Callable[[Any], str] | None = None

    def to_crd(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out

    def user_message(self, obj: Any) -> str:
        return self.describe(obj) if self.describe else self.message
