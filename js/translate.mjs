// Translate CQL libraries to ELM JSON with the reference translator (@cqframework/cql), in one Node process.
//
// stdin:  {"libraries": {"<key>": "<CQL text>", ...}, "include": "<folder of included CQL, e.g. FHIRHelpers>"}
// stdout: {"elm": {"<key>": <ELM JSON object>, ...}, "errors": {"<key>": ["line:col message", ...]}}
// Exit 1 when any library has an error (a CqlToElmError annotation, or the translator's own error list).
//
// Annotations, locators and result types are off: the ELM is committed and compared with a fresh translation, so
// it must depend on the CQL text alone. The FHIR 4.0.1 model info is the one cql-exec-fhir ships (the engine the
// tests run the ELM in); the System model info is built into the translator.
import { createRequire } from "module";
import { dirname, join } from "path";
import { fileURLToPath } from "url";

globalThis.require = createRequire(import.meta.url); // the Kotlin-built package expects a CommonJS require
// stdout carries the JSON answer alone: the translator's own printing (kotlin-logging's greeting) goes to stderr
const writeOut = process.stdout.write.bind(process.stdout);
process.stdout.write = process.stderr.write.bind(process.stderr);

const { NamespaceManager, SystemModelInfoProvider } = await import("@cqframework/cql/cql");
const {
  CqlCompilerOptions,
  CqlTranslator,
  DefaultLibrarySourceProvider,
  DefaultModelInfoProvider,
  LibraryManager,
  ModelManager,
  stringAsPath,
} = await import("@cqframework/cql/cql-to-elm");

const here = dirname(fileURLToPath(import.meta.url));
const fhirModels = join(here, "node_modules", "cql-exec-fhir", "lib", "modelInfos");

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

function libraryManager(includeDir) {
  const models = new ModelManager(new NamespaceManager());
  models.modelInfoLoader.registerModelInfoProvider(new SystemModelInfoProvider());
  models.modelInfoLoader.registerModelInfoProvider(new DefaultModelInfoProvider(stringAsPath(fhirModels)));
  // the translator's defaults without EnableAnnotations and EnableLocators (CQL 1.5, signature level Overloads)
  const options = new CqlCompilerOptions();
  options.setOptions([CqlCompilerOptions.Options.DisableListDemotion, CqlCompilerOptions.Options.DisableListPromotion]);
  const manager = new LibraryManager(models, options);
  if (includeDir) {
    manager.librarySourceLoader.registerProvider(new DefaultLibrarySourceProvider(stringAsPath(includeDir)));
  }
  return manager;
}

function errorsOf(elm, translator) {
  const found = (elm.library.annotation || [])
    .filter((a) => a.type === "CqlToElmError" && a.errorSeverity === "error")
    .map((a) => `${a.startLine}:${a.startChar} ${a.message}`);
  const listed = translator.errors.asJsReadonlyArrayView ? translator.errors.asJsReadonlyArrayView() : [];
  for (const e of listed) {
    const text = String(e.message);
    if (!found.some((f) => f.endsWith(text))) found.push(text);
  }
  return found;
}

const request = await readStdin();
const manager = libraryManager(request.include);
const out = { elm: {}, errors: {} };
for (const [key, text] of Object.entries(request.libraries)) {
  const translator = CqlTranslator.fromText(text, manager);
  const elm = JSON.parse(translator.toJson());
  const errors = errorsOf(elm, translator);
  if (errors.length) out.errors[key] = errors;
  out.elm[key] = elm;
}
writeOut(JSON.stringify(out));
process.exitCode = Object.keys(out.errors).length ? 1 : 0;
