"""The browser pages: ``GET /`` (the chat playground) and ``GET /dashboard``
(a live view of the engine), and ``STATIC_DIR``, the folder the app serves
under ``/static``.

The pages are static files shipped in the package (``server/static``: no
CDN, no build step). They call the same API every client does (the
dashboard polls ``GET /stats``, ``server.stats``) with the API key the user
types; the pages themselves carry no secret, so they are open and left out
of the OpenAPI schema.
"""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/dashboard")
async def dashboard() -> FileResponse:
    return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")
