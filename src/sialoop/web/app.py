"""`sialoop web`: a FastAPI app serving JSON read from run directories, and one static page.

The app is made for one folder of runs (or one run directory). A run is addressed by its
folder's name only, so no request can reach a path outside that folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from sialoop.store import DB_NAME
from sialoop.web.data import RunNotFound, RunReader, list_runs

STATIC = Path(__file__).parent / "static"


class Runs:
    """The run directories a dashboard shows: the runs in a folder, or one run directory."""

    def __init__(self, where: Path):
        self.where = Path(where).resolve()
        self.single = (self.where / DB_NAME).is_file()

    def folder(self) -> Path:
        return self.where.parent if self.single else self.where

    def reader(self, name: str) -> RunReader:
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise HTTPException(404, f"no run named {name!r}")
        if self.single and name != self.where.name:
            raise HTTPException(404, f"this dashboard shows run {self.where.name} only")
        try:
            return RunReader(self.folder() / name)
        except RunNotFound as err:
            raise HTTPException(404, str(err)) from None

    def listing(self) -> list[dict[str, Any]]:
        runs = list_runs(self.folder())
        return [r for r in runs if r["dir"] == self.where.name] if self.single else runs


def create_app(where: Path) -> FastAPI:
    runs = Runs(where)
    app = FastAPI(title="sialoop", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RunNotFound)
    async def not_found(_request: Any, err: RunNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.get("/api/runs")
    def all_runs() -> list[dict[str, Any]]:
        return runs.listing()

    @app.get("/api/runs/{name}/summary")
    def summary(name: str) -> dict[str, Any]:
        return runs.reader(name).summary()

    @app.get("/api/runs/{name}/stamp")
    def stamp(name: str) -> dict[str, Any]:
        return runs.reader(name).stamp()

    @app.get("/api/runs/{name}/generations/{generation}")
    def generation(name: str, generation: int) -> dict[str, Any]:
        return runs.reader(name).generation(generation)

    @app.get("/api/runs/{name}/trajectories")
    def trajectories(
        name: str,
        version: str | None = None,
        split: str | None = None,
        correct: bool | None = None,
        error: str | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=500),
    ) -> dict[str, Any]:
        return runs.reader(name).trajectories(version, split, correct, error, offset, limit)

    @app.get("/api/runs/{name}/trajectories/{trajectory_id}")
    def trajectory(name: str, trajectory_id: str) -> dict[str, Any]:
        return runs.reader(name).trajectory(trajectory_id)

    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
