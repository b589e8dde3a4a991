"""tools/ec2_prices.py against a Pricing API answer in GetProducts' own shape, through Stubber.

tests/unit/data/pricing_get_products.json is a GetProducts response as boto3 returns
it (FormatVersion aws_v1; PriceList a list of JSON strings), cut down to four us-east-1
products; the SKUs are placeholders. t3.small's only price dimension is 0.00 and
t3.medium carries a reserved term (an upfront fee, an hourly 0.00): none of that is an
on-demand price. No request leaves the process: Stubber answers every call and fails
on an unexpected one.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from kiyot_py.providers.ec2_catalog import PriceSnapshot

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "data" / "pricing_get_products.json"
TODAY = datetime.date(2026, 12, 2)
FILTERS_US_EAST_1 = [
    {"Type": "TERM_MATCH", "Field": "regionCode", "Value": "us-east-1"},
    {"Type": "TERM_MATCH", "Field": "operatingSystem", "Value": "Linux"},
    {"Type": "TERM_MATCH", "Field": "tenancy", "Value": "Shared"},
    {"Type": "TERM_MATCH", "Field": "preInstalledSw", "Value": "NA"},
    {"Type": "TERM_MATCH", "Field": "capacitystatus", "Value": "Used"},
    {"Type": "TERM_MATCH", "Field": "licenseModel", "Value": "No License required"},
]


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ec2_prices", REPO / "tools" / "ec2_prices.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ec2_prices", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recorded() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture
def client() -> Any:
    return boto3.client(
        "pricing", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def expect(stub: Stubber, region_filters: list[dict[str, str]], page: dict[str, Any], token: str | None) -> None:
    params: dict[str, Any] = {"ServiceCode": "AmazonEC2", "Filters": region_filters, "FormatVersion": "aws_v1"}
    if token:
        params["NextToken"] = token
    stub.add_response("get_products", page, params)


def test_the_fixture_is_a_get_products_answer(recorded: dict[str, Any]) -> None:
    assert recorded["FormatVersion"] == "aws_v1"
    assert len(recorded["PriceList"]) == 4
    assert all(isinstance(item, str) for item in recorded["PriceList"])


def test_prices_are_read_from_on_demand_hourly_dimensions(tool: ModuleType, recorded: dict[str, Any]) -> None:
    prices, problems = tool.hourly_prices(recorded["PriceList"])
    assert prices == {"t3.medium": 0.0416, "m5.large": 0.096, "c5.xlarge": 0.17}  # t3.small's 0.00 is no price
    assert problems == []


def test_two_prices_for_one_type_keep_the_higher_and_say_so(tool: ModuleType, recorded: dict[str, Any]) -> None:
    t3_medium = json.loads(recorded["PriceList"][0])
    (term,) = t3_medium["terms"]["OnDemand"].values()
    (dimension,) = term["priceDimensions"].values()
    dimension["pricePerUnit"]["USD"] = "0.0500000000"
    prices, problems = tool.hourly_prices([recorded["PriceList"][0], json.dumps(t3_medium)])
    assert prices == {"t3.medium": 0.05}
    assert problems == ["t3.medium: products priced 0.0416 and 0.05, kept 0.05"]


def test_the_tool_writes_the_snapshot(
    tool: ModuleType, recorded: dict[str, Any], client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "prices.json"
    first = {"FormatVersion": "aws_v1", "PriceList": recorded["PriceList"][:2], "NextToken": "page-2"}
    second = {"FormatVersion": "aws_v1", "PriceList": recorded["PriceList"][2:]}
    with Stubber(client) as stub:
        expect(stub, FILTERS_US_EAST_1, first, None)
        expect(stub, FILTERS_US_EAST_1, second, "page-2")
        assert tool.main(["--regions", "us-east-1", "--out", str(out)], client=client, today=TODAY) == 0
        stub.assert_no_pending_responses()

    assert json.loads(out.read_text()) == {
        "source": "AWS Price List Query API (pricing:GetProducts)",
        "date": "2026-12-02",
        "currency": "USD",
        "terms": "OnDemand, Linux, Shared tenancy, no pre-installed software",
        "regions": {"us-east-1": {"c5.xlarge": 0.17, "m5.large": 0.096, "t3.medium": 0.0416}},
    }
    snapshot = PriceSnapshot.load(out)  # the format the provider reads
    assert snapshot.price("us-east-1", "t3.medium") == 0.0416
    assert snapshot.price("us-east-1", "t3.small") is None
    assert "us-east-1: 3 instance types" in capsys.readouterr().err


def test_a_region_without_prices_writes_nothing(
    tool: ModuleType, recorded: dict[str, Any], client: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "prices.json"
    nowhere = [dict(f, Value="us-nowhere-1") if f["Field"] == "regionCode" else f for f in FILTERS_US_EAST_1]
    with Stubber(client) as stub:
        expect(stub, FILTERS_US_EAST_1, recorded, None)
        expect(stub, nowhere, {"FormatVersion": "aws_v1", "PriceList": []}, None)
        assert tool.main(["--regions", "us-east-1, us-nowhere-1", "--out", str(out)], client=client) == 1
    assert not out.exists()
    assert "no prices for 'us-nowhere-1'" in capsys.readouterr().err


def test_help_says_what_the_tool_does(
    tool: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for words in ("pricing:GetProducts", "--regions", "us-east-1,us-west-2", "--out", "--endpoint-url"):
        assert words in text


def test_the_pricing_client_retries_in_standard_mode(tool: ModuleType) -> None:
    made = tool.make_client("http://127.0.0.1:1")
    assert made.meta.region_name == "us-east-1"
    assert made.meta.endpoint_url == "http://127.0.0.1:1"
    assert made.meta.config.retries["mode"] == "standard"
