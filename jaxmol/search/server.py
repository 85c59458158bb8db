"""The search web page and its JSON endpoint, on the standard library's HTTP server.

    python search.py serve --index DIR [--port 8000]      # http://127.0.0.1:8000/

Routes:

* ``GET /?q=...&k=...``: the page. A text box and k; with ``q`` the results are rendered on the
  server, as a grid of RDKit SVG drawings with id, SMILES (copyable) and score (a text index
  shows the query molecule and the hit texts). The form submits with GET, so a search is a
  URL that can be bookmarked or shared.
* ``GET /api/search?q=...&k=...`` and ``POST /api/search`` with a JSON body ``{"q": "...",
  "k": 10}`` or ``{"queries": ["...", ...], "k": 10}``: the same results as JSON.
* ``GET /api/info``: what the index holds and which checkpoint embedded it.

Bad input (an empty query, k not an integer in 1 ... `max_k`, a query longer than
`max_query_chars`, more than `max_queries` queries, a body over `max_body_bytes`, invalid JSON, a
SMILES RDKit cannot read) gets a 4xx with ``{"error": message}`` from the API and the message on
the page; the server keeps running. Searches run one at a time (a lock), each batched on the
devices.

Why the standard library (`http.server.ThreadingHTTPServer`): the page is one form and one
JSON endpoint for a few chemists on one machine, served on 127.0.0.1 by default; a framework
(Flask, FastAPI + uvicorn) would add dependencies and a second way to run things for no feature
this needs. It is not hardened for the open internet: keep it on localhost or behind a proxy.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jaxmol.search.index import Index, SearchResult

logger = logging.getLogger(__name__)

DEFAULT_K = 10
MAX_K = 100
MAX_QUERY_CHARS = 2_000
MAX_QUERIES = 100
MAX_BODY_BYTES = 64 * 1024
DRAWING_SIZE = (220, 170)


class RequestError(ValueError):
    """A bad request: its message is shown to the user, with `status`."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@functools.lru_cache(maxsize=4096)
def molecule_svg(smiles: str) -> str:
    """An RDKit 2D drawing of `smiles` as inline SVG ('' when RDKit cannot read it)."""
    from rdkit import Chem, rdBase
    from rdkit.Chem.Draw import rdMolDraw2D

    blocker = rdBase.BlockLogs()
    try:
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            return ""
        drawer = rdMolDraw2D.MolDraw2DSVG(*DRAWING_SIZE)
        drawer.drawOptions().clearBackground = False
        rdMolDraw2D.PrepareAndDrawMolecule(drawer, mol)
        drawer.FinishDrawing()
        svg = drawer.GetDrawingText()
    finally:
        del blocker
    return svg[svg.index("<svg") :]  # no XML declaration inside HTML


class SearchApp:
    """Validates requests and runs searches against one index (thread-safe).

    Args:
      index: an `Index` with a retriever attached.
      max_k, max_query_chars, max_queries, max_body_bytes: request limits.
    """

    def __init__(
        self,
        index: Index,
        *,
        max_k: int = MAX_K,
        max_query_chars: int = MAX_QUERY_CHARS,
        max_queries: int = MAX_QUERIES,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        if index.retriever is None:
            raise ValueError("the index needs a retriever attached to serve queries")
        self.index = index
        self.max_k = max_k
        self.max_query_chars = max_query_chars
        self.max_queries = max_queries
        self.max_body_bytes = max_body_bytes
        self._lock = threading.Lock()

    @property
    def query_name(self) -> str:
        return "description" if self.index.kind == "molecules" else "SMILES"

    def info(self) -> dict:
        meta = self.index.meta
        return {
            "kind": self.index.kind,
            "count": self.index.count,
            "dimension": self.index.dimension,
            "dtype": meta["dtype"],
            "checkpoint": meta["checkpoint"],
            "num_failures": meta["num_failures"],
            "max_k": self.max_k,
            "description": self.index.describe(),
        }

    def parse_k(self, value) -> int:
        if value is None or value == "":
            return DEFAULT_K
        try:
            k = int(value)
            if isinstance(value, float | bool) or str(k) != str(value).strip():
                raise ValueError
        except (TypeError, ValueError):
            raise RequestError(f"k must be a whole number from 1 to {self.max_k}") from None
        if not 1 <= k <= self.max_k:
            raise RequestError(f"k must be from 1 to {self.max_k}, got {k}")
        return k

    def check_query(self, query) -> str:
        if not isinstance(query, str) or not query.strip():
            raise RequestError(f"empty query: type a {self.query_name} to search for")
        if len(query) > self.max_query_chars:
            raise RequestError(
                f"query too long: {len(query):,} characters, at most {self.max_query_chars:,}",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        return query.strip()

    def search(self, queries: list, k: int) -> list[SearchResult]:
        if not queries:
            raise RequestError("no query given")
        if len(queries) > self.max_queries:
            raise RequestError(
                f"too many queries: {len(queries)}, at most {self.max_queries}",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        queries = [self.check_query(q) for q in queries]
        with self._lock:
            return self.index.search(queries, k=k)


# ---------------------------------------------------------------------------------------------
# The page.
# ---------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.4rem; margin: 0 0 .3rem; }
.about { color: #666; font-size: .85rem; margin-bottom: 1rem; }
form { display: flex; gap: .5rem; align-items: flex-start; flex-wrap: wrap; }
textarea { width: min(60rem, 100%); height: 4.2rem; font: inherit; padding: .4rem; }
input[type=number] { width: 4.5rem; font: inherit; padding: .3rem; }
button { font: inherit; padding: .35rem .9rem; cursor: pointer; }
.error { background: #fde8e8; color: #8a1c1c; border: 1px solid #f5b5b5; padding: .6rem .8rem;
         margin: 1rem 0; border-radius: 4px; }
.summary { margin: 1rem 0 .5rem; color: #444; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr));
        gap: .8rem; }
.hit { border: 1px solid #ddd; border-radius: 6px; padding: .5rem; background: #fafafa; }
.hit svg { display: block; margin: 0 auto; background: #fff; border-radius: 4px; }
.meta { display: flex; justify-content: space-between; font-size: .85rem; margin: .3rem 0; }
.rank { font-weight: 600; }
.smiles { display: flex; gap: .3rem; }
.smiles input { flex: 1; font-family: ui-monospace, monospace; font-size: .75rem; padding: .2rem; }
.smiles button { font-size: .75rem; padding: .1rem .4rem; }
.text-hit { grid-column: 1 / -1; }
.query-molecule { margin: 1rem 0; }
"""

_SCRIPT = """
function copySmiles(button) {
  const field = button.previousElementSibling;
  field.select();
  const done = () => { button.textContent = 'copied'; };
  if (navigator.clipboard) { navigator.clipboard.writeText(field.value).then(done, done); }
  else { document.execCommand('copy'); done(); }
}
"""


def _hit_html(hit: dict, kind: str) -> str:
    score = f"{hit['score']:.4f}"
    identifier = html.escape(hit["id"])
    if kind == "texts":
        return (
            f'<div class="hit text-hit"><div class="meta"><span class="rank">#{hit["rank"]}'
            f"</span><span>id {identifier}</span><span>score {score}</span></div>"
            f"<div>{html.escape(hit['text'])}</div></div>"
        )
    smiles = html.escape(hit["smiles"], quote=True)
    return (
        f'<div class="hit"><div class="meta"><span class="rank">#{hit["rank"]}</span>'
        f"<span>id {identifier}</span><span>score {score}</span></div>"
        f'<div class="drawing">{molecule_svg(hit["smiles"])}</div>'
        f'<div class="smiles"><input readonly value="{smiles}" aria-label="SMILES" '
        f'onclick="this.select()"><button type="button" onclick="copySmiles(this)">copy'
        f"</button></div></div>"
    )


def render_page(
    app: SearchApp,
    query: str = "",
    k: int | str = DEFAULT_K,
    result: SearchResult | None = None,
    error: str | None = None,
) -> str:
    """The whole page: the form, an error message or the results."""
    info = app.info()
    kind = info["kind"]
    prompt = (
        "Describe the molecules you are looking for"
        if kind == "molecules"
        else "Give a molecule (SMILES) to find its descriptions"
    )
    placeholder = (
        "e.g. an aromatic amine that is a ligand of dopamine receptors"
        if kind == "molecules"
        else "e.g. CC(=O)Oc1ccccc1C(=O)O"
    )
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>jaxmol search{' – ' + html.escape(query[:60]) if query else ''}</title>",
        f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>jaxmol search: {info['count']:,} {kind}</h1>",
        f"<div class='about'>{html.escape(info['description'])}</div>",
        "<form method='get' action='/'>",
        f"<label for='q' hidden>{html.escape(prompt)}</label>",
        f"<textarea id='q' name='q' placeholder='{html.escape(placeholder, quote=True)}' "
        f"maxlength='{app.max_query_chars}' autofocus>{html.escape(query)}</textarea>",
        f"<label>k <input type='number' name='k' min='1' max='{app.max_k}' "
        f"value='{html.escape(str(k), quote=True)}'></label>",
        "<button type='submit'>Search</button></form>",
    ]
    if error:
        parts.append(f"<div class='error' role='alert'>{html.escape(error)}</div>")
    if result is not None:
        hits = result.hits()
        parts.append(
            f"<div class='summary'>top {len(hits)} of {info['count']:,} {kind} for "
            f"<q>{html.escape(result.query)}</q> (cosine score; tied hits share a rank)</div>"
        )
        if kind == "texts":
            parts.append(f"<div class='query-molecule'>{molecule_svg(result.query)}</div>")
        parts.append("<div class='grid' id='results'>")
        parts.extend(_hit_html(hit, kind) for hit in hits)
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# HTTP.
# ---------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    app: SearchApp  # set on the subclass made by `make_server`
    server_version = "jaxmol-search"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        logger.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: str, content_type: str) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, status: int, value: dict) -> None:
        self._send(status, json.dumps(value, ensure_ascii=False), "application/json")

    def _json_error(self, error: Exception) -> None:
        if isinstance(error, RequestError):
            self._json(error.status, {"error": str(error)})
        else:
            logger.exception("search failed")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"search failed: {error}"})

    def _results_json(self, results: list[SearchResult], k: int) -> dict:
        return {"k": k, "kind": self.app.index.kind, "results": [r.to_dict() for r in results]}

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        params = urllib.parse.parse_qs(url.query, keep_blank_values=True)

        def first(name):
            values = params.get(name)
            return values[0] if values else None

        if url.path in ("/", "/index.html"):
            self._page(first("q"), first("k"))
        elif url.path == "/api/search":
            try:
                k = self.app.parse_k(first("k"))
                results = self.app.search(params.get("q", []), k)
            except Exception as error:  # every failure is an answer; the server goes on
                self._json_error(error)
                return
            status = HTTPStatus.OK if not any(r.error for r in results) else HTTPStatus.BAD_REQUEST
            self._json(status, self._results_json(results, k))
        elif url.path == "/api/info":
            self._json(HTTPStatus.OK, self.app.info())
        elif url.path == "/health":
            self._send(HTTPStatus.OK, "ok\n", "text/plain")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})

    def _page(self, query: str | None, k_value: str | None) -> None:
        app = self.app
        if query is None:  # the empty form
            self._send(HTTPStatus.OK, render_page(app), "text/html")
            return
        k_shown = k_value if k_value is not None else DEFAULT_K
        try:
            k = app.parse_k(k_value)
            (result,) = app.search([query], k)
            if result.error:
                raise RequestError(f"cannot search for this SMILES: {result.error}")
        except Exception as error:
            status = getattr(error, "status", HTTPStatus.INTERNAL_SERVER_ERROR)
            if not isinstance(error, RequestError):
                logger.exception("search failed")
            page = render_page(app, query[: app.max_query_chars], k_shown, error=str(error))
            self._send(status, page, "text/html")
            return
        self._send(HTTPStatus.OK, render_page(app, query, k, result), "text/html")

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/api/search":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {url.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._json(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
            return
        if length > self.app.max_body_bytes:
            self.close_connection = True  # the body is not read: drop the connection after
            self._json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"request body of {length:,} bytes; at most {self.app.max_body_bytes:,}"},
            )
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict):
                raise RequestError('the body must be a JSON object: {"q": "...", "k": 10}')
            k = self.app.parse_k(body.get("k"))
            queries = body.get("queries", [body["q"]] if "q" in body else [])
            if not isinstance(queries, list):
                raise RequestError("'queries' must be a list of strings")
            results = self.app.search(queries, k)
        except json.JSONDecodeError as error:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"invalid JSON: {error}"})
            return
        except Exception as error:
            self._json_error(error)
            return
        status = HTTPStatus.OK if not any(r.error for r in results) else HTTPStatus.BAD_REQUEST
        self._json(status, self._results_json(results, k))


def make_server(
    index: Index, host: str = "127.0.0.1", port: int = 8000, **limits
) -> ThreadingHTTPServer:
    """A server for `index` (not started: call `serve_forever`, e.g. in a thread).

    Args:
      index: an `Index` with a retriever attached.
      host: the address to listen on (default this machine only).
      port: the port (0: any free one; read it from ``server.server_address``).
      **limits: `SearchApp` limits.
    """
    app = SearchApp(index, **limits)
    handler = type("SearchHandler", (_Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
