// Starts the real identity-service (`identity-service serve`) on a free port for a test file.
import { spawn } from "node:child_process";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const SERVICE_BIN =
  process.env.IDENTITY_SERVICE_BIN ?? path.resolve(here, "..", "..", "..", ".venv", "bin", "identity-service");
export const WRITE_KEY = "node-sdk-test-write-key-0123456789";

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * Runs `identity-service serve --port N` with IDENTITY_DEV_WRITE_KEY (and `env`), waits for
 * /healthz. Events are printed by the service as JSON lines on its stdout: `events()` parses them.
 */
export async function startService(env = {}) {
  const port = await freePort();
  const childEnv = {};
  // The service refuses unknown IDENTITY_* variables (IDENTITY_SERVICE_BIN, IDENTITY_URL...).
  for (const [key, value] of Object.entries(process.env)) if (!key.startsWith("IDENTITY_")) childEnv[key] = value;
  Object.assign(childEnv, { IDENTITY_DEV_WRITE_KEY: WRITE_KEY, IDENTITY_LOG_LEVEL: "warning" }, env);
  const child = spawn(SERVICE_BIN, ["serve", "--host", "127.0.0.1", "--port", String(port)], {
    env: childEnv,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (chunk) => (stdout += chunk));
  child.stderr.setEncoding("utf8").on("data", (chunk) => (stderr += chunk));
  let exited = null;
  child.on("exit", (code, signal) => (exited = { code, signal }));
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (exited) throw new Error(`identity-service exited (${JSON.stringify(exited)}): ${stderr}`);
    try {
      const answer = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(500) });
      if (answer.ok) break;
    } catch {
      /* not up yet */
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`identity-service did not answer /healthz within 20 s: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    url,
    port,
    events() {
      return stdout
        .split("\n")
        .filter((line) => line.startsWith("{"))
        .map((line) => {
          try {
            return JSON.parse(line);
          } catch {
            return null;
          }
        })
        .filter((event) => event && event.type);
    },
    async stop() {
      if (exited) return;
      const done = new Promise((resolve) => child.once("exit", resolve));
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
      await done;
      clearTimeout(timer);
    },
  };
}

/** A tiny real HTTP server: `handler(req, res, count)`; `count` is the number of requests so far. */
export async function startHttpServer(handler) {
  const http = await import("node:http");
  let count = 0;
  const server = http.createServer((req, res) => {
    count += 1;
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (chunk) => (body += chunk));
    req.on("end", () => handler(req, res, count, body));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    get count() {
      return count;
    },
    close() {
      server.closeAllConnections?.();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
