"""Sign-in for the page: directory's tokens, with the refresh token kept out of reach of scripts.

The page holds the access token in memory only. The refresh token lives in an HttpOnly,
SameSite=Strict cookie scoped to /app/session (Secure when the page is served over https), so a
reload signs the user back in without any token in localStorage. Every cookie-using request must
carry the X-Clinic-CSRF header (a cross-site form cannot set it) and come from an allowed Origin.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

import requests
from flask import Response, jsonify, request

from services.kit.errors import Forbidden, Unavailable
from services.kit.http import REAL_IP, Network, client_address, error_response

REFRESH_COOKIE = "clinic_refresh"
COOKIE_PATH = "/app/session"
CSRF_HEADER = "X-Clinic-CSRF"
DIRECTORY_TIMEOUT_S = 10.0


def check_same_origin(allowed_origins: tuple[str, ...]) -> None:
    """Refuse a cookie-using request that a page of another origin could have made."""
    if request.headers.get(CSRF_HEADER) != "1":
        raise Forbidden("csrf_refused", f"the {CSRF_HEADER} header is required")
    origin = request.headers.get("Origin")
    if origin is None:
        # Browsers send Origin on every POST; Sec-Fetch-Site is the fallback some send instead.
        if request.headers.get("Sec-Fetch-Site") == "same-origin":
            return
        raise Forbidden("csrf_refused", "the request's origin is unknown")
    if origin.rstrip("/") not in allowed_origins:
        raise Forbidden("csrf_refused", "requests from this origin are not accepted")


def is_https() -> bool:
    proto = request.headers.get("X-Forwarded-Proto", request.scheme)
    return proto.split(",")[0].strip().lower() == "https"


class DirectorySessions:
    """Calls directory's /api/v1/auth endpoints on the page's behalf."""

    def __init__(
        self,
        directory_url: str,
        cookie_max_age_s: int,
        https_only: bool = False,
        trusted_proxies: Sequence[Network] = (),
    ):
        """`https_only`: the page is only ever served over https (every allowed origin is https), so
        the cookie is Secure whatever a forwarded header says about this one request.
        `trusted_proxies`: the hops whose X-Real-IP names the client (the gateway)."""
        self.directory_url = directory_url
        self.cookie_max_age_s = cookie_max_age_s
        self.https_only = https_only
        self.trusted_proxies = tuple(trusted_proxies)
        self.http = requests.Session()

    def _call(self, path: str, body: dict | None, authorization: str | None = None) -> requests.Response:
        # The client's address, as this service was told it by a trusted hop or saw it: directory
        # trusts this service to state it, and spends that address's sign-in budget.
        headers = {REAL_IP: client_address(self.trusted_proxies)}
        if authorization:
            headers["Authorization"] = authorization
        try:
            return self.http.post(
                urllib.parse.urljoin(self.directory_url + "/", path.lstrip("/")),
                json=body,
                headers=headers,
                timeout=DIRECTORY_TIMEOUT_S,
            )
        except requests.RequestException as exc:
            raise Unavailable("directory_unavailable", "sign-in is unavailable; try again shortly") from exc

    def activity(self) -> Response:
        """The page's report of its user's activity, passed on with its bearer token (directory
        moves the session's idle deadline); 204, or directory's refusal."""
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            return error_response(401, "unauthenticated", "a bearer access token is required")
        answer = self._call("/api/v1/auth/activity", None, authorization)
        if answer.status_code == 204:
            return Response(status=204)
        if answer.status_code >= 500:
            return error_response(503, "directory_unavailable", "activity could not be recorded; try again shortly")
        try:
            body = answer.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        return error_response(answer.status_code, body.get("code", "error"), body.get("message", ""))

    def sign_in(self, username: object, password: object) -> Response:
        if not isinstance(username, str) or not isinstance(password, str):
            return error_response(400, "invalid_type", "username and password must be strings")
        return self._grant(self._call("/api/v1/auth/token", {"username": username, "password": password}))

    def refresh(self, probe: bool = False) -> Response:
        token = request.cookies.get(REFRESH_COOKIE)
        if not token:
            # The page's check on load (`probe`) finding no session is no failure: 204, nothing to resume.
            return Response(status=204) if probe else error_response(401, "not_signed_in", "no session to resume")
        response = self._grant(self._call("/api/v1/auth/refresh", {"refresh_token": token}))
        if response.status_code == 401:
            self._clear(response)
        return response

    def sign_out(self) -> Response:
        token = request.cookies.get(REFRESH_COOKIE)
        if token:
            answer = self._call("/api/v1/auth/logout", {"refresh_token": token})
            if answer.status_code >= 500:
                return error_response(503, "directory_unavailable", "sign-out is unavailable; try again shortly")
        response = Response(status=204)
        self._clear(response)
        return response

    def _grant(self, answer: requests.Response) -> Response:
        try:
            body = answer.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error_response(502, "bad_directory_answer", "sign-in answered unexpectedly")
        if answer.status_code != 200:
            response = error_response(answer.status_code, body.get("code", "error"), body.get("message", ""))
            if "Retry-After" in answer.headers:
                response.headers["Retry-After"] = answer.headers["Retry-After"]
            return response
        refresh_token = body.pop("refresh_token", "")
        response = jsonify({k: body[k] for k in ("access_token", "token_type", "expires_in", "staff") if k in body})
        response.set_cookie(
            REFRESH_COOKIE,
            refresh_token,
            max_age=self.cookie_max_age_s,
            path=COOKIE_PATH,
            secure=self._secure(),
            httponly=True,
            samesite="Strict",
        )
        return response

    def _secure(self) -> bool:
        return self.https_only or is_https()

    def _clear(self, response: Response) -> None:
        response.delete_cookie(
            REFRESH_COOKIE, path=COOKIE_PATH, secure=self._secure(), httponly=True, samesite="Strict"
        )
