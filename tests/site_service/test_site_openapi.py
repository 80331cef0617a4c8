"""The OpenAPI document: valid per the OpenAPI specification, every route under /api/v1,
every protected operation declaring the bearer scheme and the error shape."""

from __future__ import annotations

from typing import Any

import pytest

from site_service.apiclient import Api

pytestmark = pytest.mark.anyio
V1 = "/api/v1"


@pytest.fixture
def backend() -> str:
    """SQLite only: the document does not depend on the database backend."""
    return "sqlite"


async def _doc(api: Api) -> dict[str, Any]:
    response = await api.client.get(f"{V1}/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


async def test_openapi_document_is_valid(api: Api) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(await _doc(api))


async def test_every_operation_is_versioned_secured_and_documents_errors(api: Api) -> None:
    doc = await _doc(api)
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "ErrorBody" in doc["components"]["schemas"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        assert path.startswith(f"{V1}/"), path
        for method, op in item.items():
            assert op.get("summary"), (method, path)
            if path == f"{V1}/health":
                assert "security" not in op
                continue
            assert op["security"] == [{"HTTPBearer": []}], (method, path)
            for status in ("401", "422"):
                ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), (method, path, status)


async def test_request_models_forbid_unknown_fields(api: Api) -> None:
    schemas = (await _doc(api))["components"]["schemas"]
    for name in ("VmCreate", "VolumeSpec", "VpgCreate", "VpgUpdate", "VpgSettings", "TokenCreate"):
        assert schemas[name]["additionalProperties"] is False, name
