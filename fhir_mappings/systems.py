"""Code-system URIs: the canonical form we emit, and the variants seen in the wild that we accept."""

from __future__ import annotations

HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
NDC = "http://hl7.org/fhir/sid/ndc"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
SNOMED = "http://snomed.info/sct"
NUCC = "http://nucc.org/provider-taxonomy"
UCUM = "http://unitsofmeasure.org"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10PCS = "http://www.cms.gov/Medicare/Coding/ICD10"
POS = "https://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set"
ACTCODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
HSLOC = "https://www.cdc.gov/nhsn/cdaportal/terminology/codesystem/hsloc.html"
NPI = "http://hl7.org/fhir/sid/us-npi"
# FHIR R4 MedicationRequest.category (inpatient, outpatient, community, discharge): where the drug is meant to be used
MEDREQ_CATEGORY = "http://terminology.hl7.org/CodeSystem/medicationrequest-category"
# not a code system: a product identified by the name on the order (text or display), for products with no NDC or
# RxNorm code in any source read (Regiocit); rows name one lower-case word
PRODUCT_NAME = "urn:cds:product-name"

CANONICAL = frozenset(
    {
        HCPCS,
        NDC,
        RXNORM,
        LOINC,
        ICD10CM,
        SNOMED,
        NUCC,
        CPT,
        ICD10PCS,
        POS,
        ACTCODE,
        HSLOC,
        NPI,
        MEDREQ_CATEGORY,
        PRODUCT_NAME,
    }
)

ALIASES: dict[str, str] = {
    # HCPCS appears under three URIs across the Da Vinci IGs and the CDS-Library (codes.md §0)
    "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets": HCPCS,
    "https://bluebutton.cms.gov/resources/codesystem/hcpcs": HCPCS,
    "http://www.nlm.nih.gov/research/umls/rxnorm/": RXNORM,
    "http://hl7.org/fhir/sid/icd-10": ICD10CM,
    "https://loinc.org": LOINC,
    "http://www.cms.gov/Medicare/Coding/place-of-service-codes/Place_of_Service_Code_Set": POS,
    "https://www.ama-assn.org/go/cpt": CPT,
}

# families of codes a mapping row may name with a trailing '*' (ICD-10 descendants: F32.* is every F32 code)
PREFIX_SYSTEMS = frozenset({ICD10CM, ICD10PCS})


def canonical_system(system: str | None) -> str | None:
    if system is None:
        return None
    system = system.strip()
    return ALIASES.get(system, system)


def normalize_code(system: str, code: str) -> tuple[str, ...]:
    """The lookup keys a code may match under ``system``. NDCs have several spellings, so more than one key."""
    code = code.strip()
    if system == NDC:
        return ndc_keys(code)
    if system in (ICD10CM, ICD10PCS, HCPCS, NUCC, CPT):
        return (code.upper(),)
    if system == PRODUCT_NAME:
        return (code.lower(),)
    return (code,)


def name_words(text: str) -> tuple[str, ...]:
    """The words of a product name, as PRODUCT_NAME rows are keyed ("Regiocit 5000 mL bag" -> regiocit, 5000 ...)."""
    return tuple(w for w in "".join(c.lower() if c.isalnum() else " " for c in text).split() if w)


_NDC_SHAPES = ((4, 4, 2), (5, 3, 2), (5, 4, 1))


def ndc_keys(code: str) -> tuple[str, ...]:
    """Normalise an NDC to 11-digit 5-4-2 package form (``00053-0100-10``) or 5-4 product form (``00053-0100``).

    Hyphenated 10-digit codes are unambiguous; a bare 10-digit code could be any of three shapes, so every
    reading is returned and the lookup decides.
    """
    parts = code.split("-")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return (f"{parts[0].zfill(5)}-{parts[1].zfill(4)}-{parts[2].zfill(2)}",)
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return (f"{parts[0].zfill(5)}-{parts[1].zfill(4)}",)
    if len(parts) == 1 and code.isdigit():
        if len(code) == 11:
            return (f"{code[:5]}-{code[5:9]}-{code[9:]}",)
        if len(code) == 10:
            keys = []
            for a, b, _c in _NDC_SHAPES:
                seg = (code[:a], code[a : a + b], code[a + b :])
                keys.append(f"{seg[0].zfill(5)}-{seg[1].zfill(4)}-{seg[2].zfill(2)}")
            return tuple(keys)
    return (code,)
