"""Fibonacci: ``GET /?n=10`` answers the first ten Fibonacci numbers.

    $ curl 'http://fibonacci.faas/?n=10'
    0, 1, 1, 2, 3, 5, 8, 13, 21, 34

The body is the first ``n`` numbers of the sequence, starting 0, 1, separated by ", " and
ended by a newline (``n=0`` gives an empty line). ``n`` defaults to 10 and must be a
whole number from 0 to 1000; anything else is answered with 400 and the reason. Any
path works; methods other than GET and HEAD get 405.
"""

from faas_handler import Request, Response, serve

DEFAULT_N = 10
MAX_N = 1000  # fib(1000) has 209 digits: the cap keeps the answer (and the work) small


def fibonacci(n: int) -> list[int]:
    """The first ``n`` Fibonacci numbers: 0, 1, 1, 2, 3, 5..."""
    numbers, a, b = [], 0, 1
    for _ in range(n):
        numbers.append(a)
        a, b = b, a + b
    return numbers


def parse_n(raw: str) -> int:
    """``n`` from the query string; ValueError with a message for the client."""
    # isascii: str.isdigit() also accepts digits like "²" that int() refuses
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_N:
        raise ValueError(f"n must be a whole number from 0 to {MAX_N}, not {raw[:40]!r}")
    return int(raw)


def handle(request: Request) -> Response:
    """Answer one request."""
    if request.method not in ("GET", "HEAD"):
        return Response("only GET and HEAD are served\n", 405, {"Allow": "GET, HEAD"})
    try:
        n = parse_n(request.query.get("n", str(DEFAULT_N)))
    except ValueError as exc:
        return Response(f"{exc}\n", 400)
    body = ", ".join(str(x) for x in fibonacci(n)) + "\n"
    return Response(body, 200, {"Content-Type": "text/plain; charset=utf-8"})


if __name__ == "__main__":
    serve(handle)
