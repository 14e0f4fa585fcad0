"""The server's one error type for clients: a status and a JSON body {error, fix}."""

from __future__ import annotations

from http import HTTPStatus


class RequestError(Exception):
    """A bad request: answered with `status` and a JSON error (problem, fix); the server goes on."""

    def __init__(self, status: HTTPStatus, problem: str, fix: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(problem)
        self.status, self.problem, self.fix, self.headers = status, problem, fix, headers or {}
