// Forms built from the API's OpenAPI schema: a control per property with its bounds and
// default, so the page never restates the API's ranges.

import { field, h } from "./dom.js";

function typeOf(prop) {
  const kinds = prop.anyOf ? prop.anyOf : [prop];
  const main = kinds.find((k) => k.type && k.type !== "null") || {};
  return { ...main, nullable: kinds.some((k) => k.type === "null"), default: prop.default };
}

function words(name) {
  return name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase()).replace(/^Rpo /, "RPO ");
}

function hint(t) {
  const parts = [];
  if (t.minimum !== undefined) parts.push(`at least ${t.minimum}`);
  if (t.exclusiveMinimum !== undefined) parts.push(`more than ${t.exclusiveMinimum}`);
  if (t.maximum !== undefined) parts.push(`at most ${t.maximum}`);
  if (t.exclusiveMaximum !== undefined) parts.push(`less than ${t.exclusiveMaximum}`);
  if (t.default !== undefined && t.default !== null) parts.push(`default ${t.default}`);
  else if (t.nullable && t.type !== "boolean") parts.push("empty: none");
  return parts.join(", ");
}

// schema: an object schema; values: the current settings (or null for the defaults).
// Returns {element, collect()}; collect() gives only the properties the user set or changed.
export function settingsFields(schema, values, legend) {
  const controls = [];
  const rows = Object.entries(schema.properties).map(([name, prop]) => {
    const t = typeOf(prop);
    const current = values ? values[name] : t.default;
    let input;
    if (t.type === "boolean") {
      input = h("input", { type: "checkbox", name, checked: Boolean(current) });
    } else if (t.type === "string") {
      input = h("input", { type: "text", name, value: current === null || current === undefined ? "" : String(current) });
      if (t.maxLength !== undefined) input.maxLength = t.maxLength;
    } else {
      input = h("input", { type: "number", name, step: "any",
        value: current === null || current === undefined ? "" : String(current) });
      if (t.minimum !== undefined) input.min = t.minimum;
      if (t.maximum !== undefined) input.max = t.maximum;
    }
    controls.push({ name, t, input, initial: current });
    return field(words(name), input, hint(t));
  });
  const element = h("fieldset", {}, h("legend", {}, legend), rows);
  function collect() {
    const out = {};
    for (const { name, t, input, initial } of controls) {
      let v;
      if (t.type === "boolean") v = input.checked;
      else if (input.value === "") v = t.nullable ? null : undefined;
      else if (t.type === "string") v = input.value;
      else v = t.type === "integer" ? parseInt(input.value, 10) : Number(input.value);
      if (v === undefined) continue;
      const before = initial === undefined ? null : initial;
      if (values === null ? v !== t.default : v !== before) out[name] = v;
    }
    return out;
  }
  return { element, collect };
}
