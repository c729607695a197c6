// The package is "type": "module"; dist/cjs holds CommonJS .js files, so it gets a
// package.json of its own saying so.
const fs = require("node:fs");
const path = require("node:path");
fs.writeFileSync(
  path.join(__dirname, "..", "dist", "cjs", "package.json"),
  JSON.stringify({ type: "commonjs" }) + "\n",
);
