// Run ELM libraries in cql-execution + cql-exec-fhir over FHIR R4 Bundles, many runs in one Node process.
//
// stdin:  {"libraries": {"<name>": <ELM JSON>, ...},        every library a run may use, includes too (FHIRHelpers)
//          "valuesets": {"<url>": {"<version>": [{"system": ..., "code": ...}, ...]}},
//          "runs": [{"id": "<run id>", "library": "<name>", "bundle": <Bundle>, "now": "<ISO dateTime>",
//                    "parameters": {"<name>": <FHIR resource JSON>, ...}}, ...]}
// stdout: {"results": {"<run id>": {"<define>": <value>, ...}}, "errors": {"<run id>": "<message>"}}
//
// Values come back as JSON: Boolean, String and numbers as they are, Date / DateTime as ISO text, Quantity as
// {"value", "unit"}, Code as {"system", "code", "display"}, a FHIR resource as {"resourceType", "id"}, other FHIR
// elements as their JSON, lists as arrays, tuples as objects.
// Function definitions are not reported. FHIR parameters are wrapped as the FHIR 4.0.1 type their resourceType names.
import cql from "cql-execution";
import cqlfhir from "cql-exec-fhir";

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

function plain(value) {
  if (value === null || value === undefined) return null;
  if (Array.isArray(value)) return value.map(plain);
  if (typeof value !== "object") return value;
  if (value.isDate || value.isDateTime) return value.toString();
  if (value.isQuantity) return { value: value.value, unit: value.unit };
  if (value instanceof cql.Code) return { system: value.system ?? null, code: value.code, display: value.display ?? null };
  if (typeof value.getTypeInfo === "function") {
    const json = value._json ?? null; // a FHIR element as it is; a resource by its type and id
    return json && json.resourceType ? { resourceType: json.resourceType, id: json.id ?? null } : json;
  }
  if (value.isUncertainty) return { low: plain(value.low), high: plain(value.high) };
  return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
}

const request = await readStdin();
const fhir = cqlfhir.FHIRWrapper.FHIRv401();
const codeService = new cql.CodeService(request.valuesets || {});
const source = cqlfhir.PatientSource.FHIRv401(); // parses the FHIR model info: once, reset for every run
const repository = new cql.Repository(request.libraries);
const compiled = new Map(); // each Library is built from its ELM once, for all its runs
const out = { results: {}, errors: {} };
for (const run of request.runs) {
  try {
    const elm = request.libraries[run.library];
    if (!compiled.has(run.library)) compiled.set(run.library, new cql.Library(elm, repository));
    const library = compiled.get(run.library);
    const parameters = Object.fromEntries(
      Object.entries(run.parameters || {}).map(([name, resource]) => [name, resource && fhir.wrap(resource)]),
    );
    source.reset();
    source.loadBundles([run.bundle]);
    const executor = new cql.Executor(library, codeService, parameters);
    const results = await executor.exec(source, cql.DateTime.parse(run.now));
    const [patientResults] = Object.values(results.patientResults);
    const defines = (elm.library.statements?.def || []).filter((d) => d.type !== "FunctionDef").map((d) => d.name);
    out.results[run.id] = Object.fromEntries(defines.map((name) => [name, plain(patientResults[name])]));
  } catch (error) {
    out.errors[run.id] = String(error?.stack || error);
  }
}
process.stdout.write(JSON.stringify(out));
