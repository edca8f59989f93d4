"""Echo: answers every request with the request itself, as text.

    $ curl -d 'hi there' 'http://echo.faas/some/path?x=1'
    POST /some/path?x=1 HTTP/1.1
    Host: echo.faas
    User-Agent: curl/7.88.1
    Accept: */*
    Content-Length: 8
    Content-Type: application/x-www-form-urlencoded

    hi there

The request line, every header as sent and, after an empty line, the body bytes as they
arrived (chunked bodies decoded). The response also carries ``X-Request-Id`` and
``X-Remote``: what the runner's conn packet said.
"""

from faas_handler import Request, Response, serve


def handle(request: Request) -> Response:
    """Answer one request with a copy of it."""
    lines = [f"{request.method} {request.target} {request.version}"]
    lines += [f"{name}: {value}" for name, value in request.header_list]
    head = "\n".join(lines) + "\n\n"
    headers = {"Content-Type": "text/plain; charset=utf-8",
               "X-Request-Id": request.id, "X-Remote": request.remote}
    # latin-1: header bytes go back exactly as they came (HTTP header values are octets)
    return Response(head.encode("latin-1") + request.body, 200, headers)


if __name__ == "__main__":
    serve(handle)
