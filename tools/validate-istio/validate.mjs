// Offline schema validation of Kubernetes custom resources: Istio's (deploy/istio) and the Prometheus
// Operator's PrometheusRule and PodMonitor (deploy/observability); part of `make validate`, driven by
// tools/validate.py.
//
// stdin:  JSON [{"id": "...", "doc": {apiVersion, kind, metadata, spec}}, ...]
// stdout: JSON [{"id": "...", "errors": ["spec.failStrategy: must be equal to one of the allowed values", ...]}]
//
// Two checks per resource, both from the @kubernetes-models package of its API group (generated from
// the CRDs):
// * the CRD's OpenAPI schema (types, enums, required fields, patterns), compiled by the package;
// * unknown fields, which the API server rejects (kubectl's strict field validation) but the CRD
//   schemas do not forbid: the field tree is read from the package's type declarations (.d.ts),
//   following the types a declaration imports from its package.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(import.meta.url);
// API group -> the package of its models.
function packageOf(group) {
  if (group === "monitoring.coreos.com") return "@kubernetes-models/prometheus-operator";
  if (/(^|\.)istio\.io$/.test(group)) return "@kubernetes-models/istio";
  return null;
}
const packageDir = (pkg) => path.dirname(require.resolve(`${pkg}/package.json`));

// ---- the field tree of a kind, from its .d.ts -------------------------------------------------

function tokenize(src) {
  const text = src.replace(/\/\*[\s\S]*?\*\//g, "").replace(/\/\/[^\n]*/g, "");
  const re = /"(?:[^"\\]|\\.)*"|[A-Za-z_$][\w$.]*|-?\d+(?:\.\d+)?|[{}<>\[\]():;?|&,=]/g;
  return text.match(re) ?? [];
}

// Shapes: {obj: {name: shape}} | {arr: shape} | {map: shape} | {free: true} (anything goes)
function combine(a, b) {
  if (a.free) return b;
  if (b.free) return a;
  if (a.obj && b.obj) {
    const obj = { ...a.obj };
    for (const [k, v] of Object.entries(b.obj)) obj[k] = k in obj ? combine(obj[k], v) : v;
    return { obj };
  }
  if (a.arr && b.arr) return { arr: combine(a.arr, b.arr) };
  if (a.map && b.map) return { map: combine(a.map, b.map) };
  return a;
}

// resolve(name): the shape of a type the file refers to by name, or null (then anything goes).
function parseInterface(src, name, resolve = () => null) {
  const toks = tokenize(src);
  let i = toks.findIndex((t, j) => t === "interface" && toks[j + 1] === name);
  if (i < 0) throw new Error(`interface ${name} not found`);
  i += 2;
  while (toks[i] !== undefined && toks[i] !== "{") i++; // extends TypeMeta
  const peek = () => toks[i];
  const take = (want) => {
    const t = toks[i++];
    if (want !== undefined && t !== want) throw new Error(`expected ${want} got ${t} at token ${i - 1}`);
    return t;
  };
  function primary() {
    const t = take();
    if (t === "{") {
      if (peek() === "}") { take(); return { free: true }; }
      if (peek() === "[") {
        take("["); take(); take(":"); take(); take("]"); take(":");
        const value = type();
        if (peek() === ";") take();
        take("}");
        return { map: value };
      }
      const obj = {};
      while (peek() !== "}") {
        const key = JSON.parse(take());
        if (peek() === "?") take();
        take(":");
        obj[key] = key in obj ? combine(obj[key], type()) : type();
        if (peek() === ";" || peek() === ",") take();
      }
      take("}");
      return { obj };
    }
    if (t === "(") { const inner = type(); take(")"); return inner; }
    if (peek() === "<") {
      // Array<T>; Exclude<T, U> and the like narrow T: its fields are the ones that may appear.
      take("<");
      const args = [type()];
      while (peek() === ",") { take(); args.push(type()); }
      take(">");
      return t === "Array" ? { arr: args[0] } : args[0];
    }
    // string, number, literals, types of other packages (IObjectMeta, IIntOrString): anything goes
    return resolve(t) ?? { free: true };
  }
  function type() {
    let shape = primary();
    while (peek() === "[" && toks[i + 1] === "]") { take(); take(); shape = { arr: shape }; }
    // A | B and A & B: a field is known when any part declares it.
    while (peek() === "|" || peek() === "&") {
      take();
      shape = combine(shape, type());
    }
    return shape;
  }
  return primary();
}

// The field tree of interface `name` in the .d.ts `file`, with the types it imports from files of
// its own package (`import { IRuleGroup } from "./RuleGroup.js"`) resolved in turn.
const shapes = new Map();

function shapeOf(file, name) {
  const key = `${file}#${name}`;
  if (shapes.has(key)) return shapes.get(key);
  shapes.set(key, { free: true }); // a type that contains itself: anything goes below that point
  const src = readFileSync(file, "utf8");
  // `export type { IRuleGroup as IComGithub...RuleGroup }`: the interface behind an exported alias
  const alias = new RegExp(`\\b(\\w+) as ${name}\\b`).exec(src);
  const local = src.includes(`interface ${name} `) || !alias ? name : alias[1];
  const imports = new Map();
  for (const m of src.matchAll(/import\s*(?:type\s*)?\{([^}]*)\}\s*from\s*"(\.[^"]+)\.js"/g)) {
    for (const n of m[1].split(",").map((x) => x.trim()).filter(Boolean)) {
      imports.set(n, path.join(path.dirname(file), `${m[2]}.d.ts`));
    }
  }
  let shape = { free: true };
  if (src.includes(`interface ${local} `)) {
    shape = parseInterface(src, local, (t) => (imports.has(t) ? shapeOf(imports.get(t), t) : null));
  }
  shapes.set(key, shape);
  return shape;
}

function unknownFields(value, shape, where, out) {
  if (shape.obj) {
    if (value === null || typeof value !== "object" || Array.isArray(value)) return;
    for (const [k, v] of Object.entries(value)) {
      const p = where ? `${where}.${k}` : k;
      if (!(k in shape.obj)) out.push(`${p}: unknown field`);
      else unknownFields(v, shape.obj[k], p, out);
    }
  } else if (shape.arr && Array.isArray(value)) {
    value.forEach((v, n) => unknownFields(v, shape.arr, `${where}[${n}]`, out));
  } else if (shape.map && value && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) unknownFields(v, shape.map, `${where}.${k}`, out);
  }
}

// ---- per resource ------------------------------------------------------------------------------

const models = new Map();

async function model(apiVersion, kind) {
  const key = `${apiVersion}/${kind}`;
  if (!models.has(key)) {
    const [group, version] = String(apiVersion).split("/");
    const pkg = packageOf(group);
    if (!pkg || !version || !/^\w+$/.test(kind ?? "")) throw new Error(`no schema package for ${key}`);
    let mod;
    try {
      mod = await import(`${pkg}/${group}/${version}/${kind}`);
    } catch {
      throw new Error(`no schema for ${key} in ${pkg}`);
    }
    const shape = shapeOf(path.join(packageDir(pkg), group, version, `${kind}.d.ts`), `I${kind}`);
    models.set(key, { Model: mod[kind], shape });
  }
  return models.get(key);
}

function schemaErrors(Model, doc) {
  try {
    new Model(doc).validate();
    return [];
  } catch (e) {
    const details = Array.isArray(e.errors) ? e.errors : null;
    if (!details) return [String(e.message ?? e)];
    return details.map((d) => {
      const at = (d.instancePath || "").split("/").slice(1)
        .reduce((acc, seg) => (/^\d+$/.test(seg) ? `${acc}[${seg}]` : acc ? `${acc}.${seg}` : seg), "") || "(root)";
      const extra = d.params?.allowedValues ? ` ${JSON.stringify(d.params.allowedValues)}` : "";
      return `${at}: ${d.message}${extra}`;
    });
  }
}

const input = JSON.parse(readFileSync(0, "utf8"));
const results = [];
for (const { id, doc } of input) {
  let errors;
  try {
    const { Model, shape } = await model(doc.apiVersion, doc.kind);
    errors = schemaErrors(Model, doc);
    const unknown = [];
    unknownFields(doc, shape, "", unknown);
    errors.push(...unknown);
  } catch (e) {
    errors = [String(e.message ?? e)];
  }
  results.push({ id, errors });
}
process.stdout.write(JSON.stringify(results));
