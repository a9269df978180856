"""APIError: every failure a route can answer, as the OpenAI error body.

    raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
    # -> HTTP 400 {"error": {"message": ..., "type": "invalid_request_error", "param": "max_tokens", "code": null}}

The same body answers every route (the Azure ML /score route included) and the `score`
command writes it into its error lines, so a client sees one error shape everywhere.
Framework-free: serve.app turns it into a response, serve.score into an output line.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None  # seconds, sent as the Retry-After header (503)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def type(self) -> str:
        """OpenAI's error type: the client's fault (4xx) or the server's (5xx)."""
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation(errors: list[dict]) -> APIError:
    """The first of pydantic's errors (``ValidationError.errors()``) as a 400 naming the field.

    loc is the path to the field ("body" stripped): ("messages", 0, "role") -> "messages[0].role".
    """
    if not errors:
        return bad_request("the request is invalid")
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    # a union's member names (str, list[str], function-after[...]) are pydantic's, not the client's
    loc = [p for p in loc if isinstance(p, int) or not (p in _TYPE_TAGS or any(c in p for c in "[]("))]
    blame = getattr(err.get("ctx", {}).get("error"), "param", None)  # a ParamError's field
    param = _param_name(loc + ([blame] if blame else []))
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param, code="unsupported_parameter")
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
    if not loc and kind in ("missing", "model_attributes_type", "dict_type", "model_type"):
        return bad_request("the request body must be a JSON object")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    message = str(err.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    where = f"{param}: " if param else ""
    return bad_request(f"{where}{message}", param=param, code="invalid_value" if param else None)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class ParamError(ValueError):
    """Raised inside a schema's validator for a rule across fields: names the field to blame."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _param_name(loc: list) -> str | None:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None
