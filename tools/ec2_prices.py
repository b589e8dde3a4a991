#!/usr/bin/env python3
"""Regenerate the EC2 on-demand price snapshot kiyot-py ships.

    python tools/ec2_prices.py                                # us-east-1 and us-west-2
    python tools/ec2_prices.py --regions eu-west-1,us-east-1 --out /tmp/prices.json

Asks the AWS Price List Query API (pricing:GetProducts, endpoint in us-east-1) for
every EC2 instance type's on-demand price per hour in each region: Linux, shared
tenancy, no pre-installed software, no license, capacitystatus Used (the price of a
running instance, not of a capacity reservation). Writes
kiyot_py/providers/data/ec2-on-demand-prices.json (or --out), dated today, in the
format kiyot_py.providers.ec2_catalog.PriceSnapshot reads. The figures change
rarely; rerun this when AWS changes a price or kiyot should know new types.

Needs boto3 and credentials allowed pricing:GetProducts (any account; the API is
free). Needs only the standard library besides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "kiyot_py" / "providers" / "data" / "ec2-on-demand-prices.json"
DEFAULT_REGIONS = ("us-east-1", "us-west-2")
# The Pricing API answers in us-east-1 (and eu-central-1, ap-south-1) only, for every region.
PRICING_REGION = "us-east-1"
SOURCE = "AWS Price List Query API (pricing:GetProducts)"
TERMS = "OnDemand, Linux, Shared tenancy, no pre-installed software"


def product_filters(region: str) -> list[dict[str, str]]:
    """GetProducts filters for one region's on-demand Linux instance prices."""
    fields = {
        "regionCode": region,
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
        "licenseModel": "No License required",
    }
    return [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in fields.items()]


def hourly_prices(price_list: Iterable[str | Mapping[str, Any]]) -> tuple[dict[str, float], list[str]]:
    """Instance type -> USD per hour from GetProducts' PriceList (JSON strings), and problems seen.

    Only OnDemand terms count, and of those only price dimensions per hour ("Hrs") with a
    price above zero: reserved terms, upfront fees and the 0.00 dimensions AWS lists for
    some products are not what an on-demand cell costs. Should two products give one type
    different prices, the higher is kept (a cost estimate had better not be low) and the
    conflict is reported.
    """
    prices: dict[str, float] = {}
    problems: list[str] = []
    for item in price_list:
        doc = json.loads(item) if isinstance(item, str) else item
        name = doc.get("product", {}).get("attributes", {}).get("instanceType")
        if not name:
            continue
        hourly: set[float] = set()
        for term in doc.get("terms", {}).get("OnDemand", {}).values():
            for dim in term.get("priceDimensions", {}).values():
                if dim.get("unit") != "Hrs":
                    continue
                try:
                    usd = float(dim.get("pricePerUnit", {}).get("USD", "0"))
                except ValueError:
                    problems.append(f"{name}: price {dim.get('pricePerUnit')!r} is not a number")
                    continue
                if usd > 0:
                    hourly.add(usd)
        if not hourly:
            continue
        price = max(hourly)
        if len(hourly) > 1:
            problems.append(f"{name}: several hourly prices {sorted(hourly)}, kept {price}")
        if name in prices and prices[name] != price:
            kept = max(price, prices[name])
            problems.append(f"{name}: products priced {prices[name]} and {price}, kept {kept}")
            price = kept
        prices[name] = price
    return prices, problems


def fetch_region(client: Any, region: str) -> tuple[dict[str, float], list[str]]:
    """All of one region's prices, through GetProducts' pages."""
    pages = client.get_paginator("get_products").paginate(
        ServiceCode="AmazonEC2", Filters=product_filters(region), FormatVersion="aws_v1"
    )
    items: list[str] = []
    for page in pages:
        items.extend(page.get("PriceList", []))
    return hourly_prices(items)


def snapshot(prices: Mapping[str, Mapping[str, float]], today: datetime.date, source: str = SOURCE) -> dict[str, Any]:
    """The snapshot document; in each region, types by family, then cheapest first (nano ... metal)."""
    return {
        "source": source,
        "date": today.isoformat(),
        "currency": "USD",
        "terms": TERMS,
        "regions": {
            region: {name: by_type[name] for name in sorted(by_type, key=lambda n: (n.split(".", 1)[0], by_type[n], n))}
            for region, by_type in sorted(prices.items())
        },
    }


def render(doc: Mapping[str, Any]) -> str:
    """One price a line, so that a regenerated file diffs by price."""
    return json.dumps(doc, indent=2) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def make_client(endpoint_url: str | None) -> Any:
    import boto3  # type: ignore[import-untyped, unused-ignore]
    from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]

    return boto3.client(
        "pricing",
        region_name=PRICING_REGION,
        endpoint_url=endpoint_url,
        config=Config(retries={"mode": "standard"}),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ec2_prices.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Regenerate kiyot-py's EC2 on-demand price snapshot (USD per hour: Linux,\n"
            "shared tenancy, no pre-installed software) from the AWS Price List Query API\n"
            "(pricing:GetProducts, asked in us-east-1). Uses boto3's usual credentials;\n"
            "they need pricing:GetProducts. Writes the file only once every region has prices."
        ),
        epilog=(
            "examples:\n"
            "  python tools/ec2_prices.py\n"
            "  python tools/ec2_prices.py --regions us-east-1,eu-west-1 --out /tmp/prices.json\n\n"
            f"default output (read by kiyot_py.providers.ec2_catalog.PriceSnapshot):\n  {DEFAULT_OUT}"
        ),
    )
    parser.add_argument(
        "--regions",
        metavar="REGION,...",
        default=",".join(DEFAULT_REGIONS),
        help="comma-separated; default: %(default)s",
    )
    parser.add_argument(
        "--out",
        metavar="PATH",
        type=Path,
        default=DEFAULT_OUT,
        help="file to write; default: the snapshot packaged with kiyot-py",
    )
    parser.add_argument(
        "--endpoint-url",
        metavar="URL",
        default=None,
        help="Pricing API endpoint to use instead of AWS's (a proxy, a test double)",
    )
    args = parser.parse_args(argv)
    args.regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    if not args.regions:
        parser.error("--regions names no region")
    return args


def main(argv: Sequence[str] | None = None, *, client: Any = None, today: datetime.date | None = None) -> int:
    """Fetch, check, write; 1 (and nothing written) when a region has no prices at all."""
    args = parse_args(argv)
    client = client if client is not None else make_client(args.endpoint_url)
    prices: dict[str, dict[str, float]] = {}
    for region in args.regions:
        by_type, problems = fetch_region(client, region)
        for problem in problems:
            print(f"ec2_prices: {region}: {problem}", file=sys.stderr)
        if not by_type:
            print(f"ec2_prices: no prices for {region!r} (not a region code?); nothing written", file=sys.stderr)
            return 1
        prices[region] = by_type
        print(f"ec2_prices: {region}: {len(by_type)} instance types", file=sys.stderr)
    doc = snapshot(prices, today or datetime.datetime.now(datetime.UTC).date())
    write_atomically(args.out, render(doc))
    print(f"ec2_prices: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
