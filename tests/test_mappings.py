"""The reviewed mapping data: strict loading, code normalisation, unit conversion."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cds.errors import MappingLoadError
from fhir_mappings import systems, units
from fhir_mappings.loader import HERE, Mappings, load_mappings

HEADER = "system,code,display,input,strength,unit,recency_days,source\n"


def test_shipped_mappings_load_and_every_row_is_reviewed(mappings: Mappings) -> None:
    assert mappings.rows
    for row in mappings.rows:
        assert row.system in systems.CANONICAL and row.display and row.source
        assert row.input in mappings.inputs


@pytest.mark.parametrize(
    "system",
    [
        "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
        "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
        "https://bluebutton.cms.gov/resources/codesystem/hcpcs",
    ],
)
def test_hcpcs_under_every_uri_the_igs_use(mappings: Mappings, system: str) -> None:
    assert [r.input for r in mappings.lookup(system, "J7189")] == ["drug.novoseven_rt"]
    assert [r.input for r in mappings.lookup(system, "j7189")] == ["drug.novoseven_rt"]


@pytest.mark.parametrize("code", ["0169-7201-01", "00169-7201-01", "00169720101", "0169720101", "0169-7201"])
def test_ndc_in_10_and_11_digits(mappings: Mappings, code: str) -> None:
    assert "drug.novoseven_rt" in {r.input for r in mappings.lookup("http://hl7.org/fhir/sid/ndc", code)}


def test_ndc_products_match_across_packages_but_not_across_products(mappings: Mappings) -> None:
    ndc = "http://hl7.org/fhir/sid/ndc"
    assert {r.input for r in mappings.lookup(ndc, "00169-7201-02")} == {"drug.novoseven_rt"}  # another package size
    assert mappings.lookup(ndc, "00169-7202-01") == ()
    assert systems.ndc_keys("71127-5000-1") == ("71127-5000-01",)


def test_unknown_codes_and_systems_match_nothing(mappings: Mappings) -> None:
    assert mappings.lookup("http://example.org/codes", "J7189") == ()
    assert mappings.lookup(None, "J7189") == ()
    assert mappings.lookup(systems.HCPCS, "") == ()


def test_rxnorm_codes(mappings: Mappings) -> None:
    assert {r.input for r in mappings.lookup(systems.RXNORM, "2386865")} == {"drug.sevenfact"}


@pytest.mark.parametrize(
    "value, src, dst, expected",
    [
        (1, "%", "[IU]/dL", 1),
        (0.02, "[IU]/mL", "%", 2),
        (50, "10*9/L", "10*3/uL", 50),
        (50, "10*3/uL", "/uL", 50000),
        (154, "[lb_av]", "kg", 69.853),
        (5, "BU", "[beth'U]/mL", 5),
        (1, "mg/kg", "ug/kg", 1000),
        (2, "mg", "ug", 2000),
    ],
)
def test_unit_conversion(value: float, src: str, dst: str, expected: float) -> None:
    assert units.convert(value, src, dst) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("src, dst", [("kg", "%"), ("mg", "ug/kg"), ("furlongs", "kg"), ("[beth'U]/mL", "%")])
def test_units_that_cannot_be_converted_raise(src: str, dst: str) -> None:
    with pytest.raises(units.UnitError):
        units.convert(1, src, dst)


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "maps"
    shutil.copytree(HERE, target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return target


@pytest.mark.parametrize(
    "row, problem",
    [
        ("http://example.org,X1,Thing,drug.novoseven_rt,proof,,,src", "unknown code system"),
        ("http://loinc.org,1-1,,obs.body_weight,proof,kg,,src", "display is blank"),
        ("http://loinc.org,1-1,Thing,no.such_input,proof,,,src", "not defined in inputs.yaml"),
        ("http://loinc.org,1-1,Thing,obs.body_weight,maybe,kg,,src", "strength"),
        ("http://loinc.org,1-1,Thing,obs.body_weight,proof,,,src", "give the unit"),
        ("http://loinc.org,1-1,Thing,obs.body_weight,proof,%,,src", "cannot convert"),
        ("http://loinc.org,1-1,Thing,obs.body_weight,proof,kg,-3,src", "recency_days"),
        ("http://loinc.org,29463-7,Body weight,obs.body_weight,proof,kg,,src", "duplicate row"),
        ("http://loinc.org,1-1,Thing,obs.body_weight,proof,kg,,", "source is blank"),
        ("http://hl7.org/fhir/sid/ndc,1234567890,Thing,drug.novoseven_rt,proof,,,src", "ambiguous"),
        ("http://loinc.org,1*,Thing,obs.body_weight,proof,kg,,src", "families"),
    ],
)
def test_bad_rows_fail_with_file_and_line(tmp_path: Path, row: str, problem: str) -> None:
    folder = _copy(tmp_path)
    with (folder / "codes.csv").open("a") as fh:
        fh.write(row + "\n")
    with pytest.raises(MappingLoadError) as err:
        load_mappings(folder)
    assert problem in str(err.value) and "codes.csv: line " in str(err.value)


def test_an_input_no_row_feeds_fails(tmp_path: Path) -> None:
    folder = _copy(tmp_path)
    with (folder / "inputs.yaml").open("a") as fh:
        fh.write("dx.orphan:\n  kind: condition\n  display: Orphan\n  question: Orphan?\n")
    with pytest.raises(MappingLoadError, match="dx.orphan .* has no code rows"):
        load_mappings(folder)


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("kind: gene\n  display: X\n  question: X?", "unknown kind"),
        ("kind: lab\n  display: X\n  question: X?", "unit"),
        ("kind: lab\n  unit: parsecs\n  display: X\n  question: X?", "not one we can convert"),
        ("kind: condition\n  question: X?", "display"),
        ("kind: answer\n  type: text\n  display: X\n  question: X?", "type"),
        ("kind: medication_history\n  drug: dx.hemophilia_a\n  display: X\n  question: X?", "not a drug input"),
    ],
)
def test_bad_inputs_fail_with_file_and_key(tmp_path: Path, spec: str, problem: str) -> None:
    folder = _copy(tmp_path)
    with (folder / "inputs.yaml").open("a") as fh:
        fh.write(f"x.bad:\n  {spec}\n")
    with pytest.raises(MappingLoadError) as err:
        load_mappings(folder)
    assert problem in str(err.value) and "inputs.yaml" in str(err.value)
