"""Spec URLs and codes, in one place (never as inline literals elsewhere)."""

from __future__ import annotations

COVERAGE_INFO_URL = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
CRD_TEMP_SYSTEM = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
CARD_TYPE_SYSTEM = CRD_TEMP_SYSTEM  # CRD 2.0.1 topics; CRD 2.2 binds the same codes extensibly
CRD_VERSIONS = ("2.2",)
TASK_CODE_SYSTEM = CRD_TEMP_SYSTEM
CRD_TASK_PROFILE = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/profile-taskquestionnaire"
DTR_QUESTIONNAIRE_PROFILE = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/dtr-std-questionnaire"
DTR_QR_PROFILE = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/dtr-questionnaireresponse"
DTR_INFORMATION_ORIGIN = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/information-origin"
DTR_QR_COVERAGE = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/qr-coverage"
DTR_QR_CONTEXT = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/qr-context"
DTR_INTENDED_USE = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/intendedUse"
SDC_ITEM_CONTROL = "http://hl7.org/fhir/StructureDefinition/questionnaire-itemControl"
SDC_UNIT_OPTION = "http://hl7.org/fhir/StructureDefinition/questionnaire-unitOption"
ITEM_CONTROL_SYSTEM = "http://hl7.org/fhir/questionnaire-item-control"
PAYER_ID_SYSTEM = "urn:cds:payer-id"
CRITERIA_SYSTEM_PATH = "/fhir/CodeSystem/policy-criteria"  # under base_url: codes are criterion ids

# configuration options every order service advertises (CRD deviations.md: one boolean per card type returned)
OPTION_COVERAGE_INFO = "coverage-info"
OPTION_GUIDELINE = "guideline"
OPTION_ALTERNATIVES = "therapy-alternatives-opt"
OPTION_FORM_COMPLETION = "request-form-completion"
OPTION_UNSOLICITED = "unsolicited-determ"
OPTION_MAX_CARDS = "max-cards"

# FHIR servers on this machine, any port (the quick start's EHR; the default for unauthenticated calls)
LOOPBACK_FHIR_SERVERS = ("http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*")
# the networks notifications may go to beyond public addresses, by default (notify_allowed_networks)
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")

# DTR and SDC (Questionnaires, responses, packages)
DTR_ADAPT_SEARCH_PROFILE = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/dtr-questionnaire-adapt-search"
DTR_ADAPT_PROFILE = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/dtr-questionnaire-adapt"
DTR_QR_ADAPT_PROFILE = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/dtr-questionnaireresponse-adapt"
DTR_PACKAGE_BUNDLE_PROFILE = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/DTR-QPackageBundle"
DTR_PACKAGE_OUTPUT_PROFILE = "http://hl7.org/fhir/us/davinci-dtr/StructureDefinition/dtr-qpackage-output-parameters"
DTR_VERSIONS = ("2.2.0", "2.0.1")  # the package and response shapes this service can speak (setting dtr_version)
CQF_LIBRARY = "http://hl7.org/fhir/StructureDefinition/cqf-library"
SDC_LAUNCH_CONTEXT = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-launchContext"
SDC_LAUNCH_CONTEXT_SYSTEM = "http://hl7.org/fhir/uv/sdc/CodeSystem/launchContext"
SDC_INITIAL_EXPRESSION = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-initialExpression"
SDC_ADAPTIVE = "http://hl7.org/fhir/uv/sdc/StructureDefinition/sdc-questionnaire-questionnaireAdaptive"
SIGNATURE_REQUIRED = "http://hl7.org/fhir/StructureDefinition/questionnaire-signatureRequired"
SIGNATURE_TYPE_SYSTEM = "urn:iso-astm:E1762-95:2013"
UCUM = "http://unitsofmeasure.org"
ASSERTION_ID_PATH = "/fhir/coverage-assertion-id"  # under base_url: the identifier system of our responses
ATTESTATION_LINK = "attestation"  # the linkId of every form's signed attestation
# the codes of qualitative results (positive / negative) a choice item answers and the CQL gives back
RESULT_SYSTEM = "http://cds-payer.org/fhir/CodeSystem/qualitative-result"
