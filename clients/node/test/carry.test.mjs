// The carry cookie's format against ../../carry-vectors.json, which the Python SDK makes
// (clients/python/tests/test_carry.py): a cookie either SDK makes is read by the other, and
// cookies signed with the right key but holding no identity are refused by both.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { MAX_CARRY_BYTES, carryKey, decodeCarry, encodeCarry } from "../dist/esm/carry.js";

const vectors = JSON.parse(readFileSync(new URL("../../carry-vectors.json", import.meta.url), "utf8"));
const key = carryKey(vectors.writeKey);

test("the same size cap as the Python SDK", () => {
  assert.equal(MAX_CARRY_BYTES, vectors.maxValueBytes);
});

test("Node makes the very cookies Python makes", () => {
  for (const { identity, value } of vectors.accepted) {
    assert.equal(encodeCarry(identity, key, vectors.expires), value, JSON.stringify(identity));
  }
});

test("Node reads the cookies Python makes, until they expire", () => {
  for (const { identity, value } of vectors.accepted) {
    assert.deepEqual(decodeCarry(value, key, vectors.now), identity);
    assert.equal(decodeCarry(value, key, vectors.expires), null);
  }
});

test("signed cookies that hold no identity are refused", () => {
  for (const [why, value] of Object.entries(vectors.refused)) {
    assert.equal(decodeCarry(value, key, vectors.now), null, why);
  }
});
