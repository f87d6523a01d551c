// src/index.d.ts is written by hand: it must declare every export of src/index.js and every
// method of its classes (the resources are reached through a Relay's fields).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import * as sdk from "../src/index.js";

const declarations = readFileSync(new URL("../src/index.d.ts", import.meta.url), "utf8");

function declaredClass(name) {
  const start = declarations.indexOf(`export declare class ${name} `);
  assert.ok(start >= 0, `${name} is not declared`);
  return declarations.slice(start, declarations.indexOf("\n}\n", start));
}

function methods(prototype) {
  return Object.getOwnPropertyNames(prototype).filter((name) => name !== "constructor");
}

test("every export is declared", () => {
  for (const name of Object.keys(sdk)) {
    assert.match(declarations, new RegExp(`export declare (class|function|const) ${name}\\b`),
                 name);
  }
});

test("every method of the client, its resources and the handle is declared", () => {
  const relay = new sdk.Relay({ url: "http://127.0.0.1:9", apiKey: "k" });
  const classes = [sdk.Relay, sdk.ExecutionHandle, sdk.RelayError, sdk.SseDecoder,
                   ...Object.values(relay).filter((v) => v?.relay === relay)
                     .map((resource) => resource.constructor)];
  assert.ok(classes.length >= 12);
  for (const cls of classes) {
    const body = declaredClass(cls.name);
    for (const method of methods(cls.prototype)) {
      assert.match(body, new RegExp(`\\n  (readonly )?${method}[(<:]`), `${cls.name}.${method}`);
    }
  }
});
