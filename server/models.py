"""``GET /v1/models`` and ``GET /v1/models/{id}``: the one served model's card.

The card names the model as clients must send it (``--served-model-name``),
its ``root`` (the path or hub id it was loaded from) and ``max_model_len``;
``created`` is when the server started (this module's import).
"""

import time
from typing import Any

from fastapi import APIRouter, Depends

from server.errors import ModelNotFoundError
from server.state import Served, served

router = APIRouter()
STARTED_AT = int(time.time())


def _model_card(state: Served) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": STARTED_AT,
        "owned_by": "tokenstep",
        "root": state.model_root or state.model_name,
        "parent": None,
        "max_model_len": state.max_model_len,
        "permission": [],
    }


@router.get("/v1/models")
async def list_models(state: Served = Depends(served)) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, state: Served = Depends(served)) -> dict[str, Any]:
    """The list's entry for the served model (by its name or its root path); 404 otherwise."""
    if model_id not in (state.model_name, state.model_root):
        raise ModelNotFoundError(f"The model `{model_id}` does not exist. Available: {state.model_name}", param="model")
    return _model_card(state)
