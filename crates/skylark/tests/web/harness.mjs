// The real server and the real command line client for the browser tests
// (e2e.mjs, e2ee.mjs): a data directory of the test's own, free ports on
// 127.0.0.1, the SMS codes the server logs, and the CLI with a profile per
// name in that directory.

import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { until } from "./lib.mjs";

function freePort() {
  return new Promise((resolve) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/// `bin`: the skylark binary. `serverDir(dataDir)`: where the server keeps
/// its data (the test's directory itself by default). `config`: the
/// server's configuration file (TOML), if the test needs other limits.
export async function harness(bin, serverDir = (dataDir) => dataDir, config = "") {
  const dataDir = mkdtempSync(join(tmpdir(), "skylark-web-"));
  const configFile = join(dataDir, "server.toml");
  writeFileSync(configFile, config);
  const [httpPort, tcpPort, adminPort] = [await freePort(), await freePort(), await freePort()];
  const base = `http://127.0.0.1:${httpPort}`;
  const codes = new Map(); // phone → latest code

  /// Starts the server; resolves once it says it is running.
  function startServer() {
    return new Promise((resolve, reject) => {
      const child = spawn(bin, ["serve", "--data-dir", serverDir(dataDir), "--http", `127.0.0.1:${httpPort}`,
        "--tcp", `127.0.0.1:${tcpPort}`, "--admin", `127.0.0.1:${adminPort}`, "--log", "info", "--config", configFile],
      { stdio: ["ignore", "pipe", "pipe"] });
      const onLine = (chunk) => {
        for (const line of chunk.toString().split("\n")) {
          const sms = line.match(/code is (\d{6}).*to=(\+\d+)/);
          if (sms) codes.set(sms[2], sms[1]);
          if (line.includes("Skylark is running")) resolve(child);
        }
      };
      child.stdout.on("data", onLine);
      child.stderr.on("data", onLine);
      child.on("exit", (code) => reject(new Error(`server exited early (${code})`)));
    });
  }

  /// Runs the command line client with a profile of its own; `input` is
  /// fed to its standard input, and `onOutput(text)` sees what it prints.
  function cli(profile, args, input, onOutput = () => {}) {
    return new Promise((resolve, reject) => {
      const child = spawn(bin, [...args, "--profile", join(dataDir, `cli-${profile}`)],
        { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, SKYLARK_SERVER: base } });
      let out = "";
      const read = (chunk) => {
        out += chunk.toString();
        onOutput(out, child);
      };
      child.stdout.on("data", read);
      child.stderr.on("data", read);
      if (input !== undefined) child.stdin.end(input);
      child.on("exit", (code) => (code === 0 ? resolve(out) : reject(new Error(`skylark ${args.join(" ")} failed:\n${out}`))));
    });
  }

  /// Runs the command line client until its output matches `pattern`, then
  /// stops it; resolves with what it printed.
  function cliUntil(profile, args, pattern, ms = 20000) {
    return new Promise((resolve, reject) => {
      let done = false;
      let printed = "";
      const timer = setTimeout(() => {
        if (!done) {
          done = true;
          reject(new Error(`skylark ${args.join(" ")} never printed ${pattern}; it printed:\n${printed}`));
        }
      }, ms);
      cli(profile, args, undefined, (out, child) => {
        printed = out;
        if (!done && pattern.test(out)) {
          done = true;
          clearTimeout(timer);
          child.kill();
          resolve(out);
        }
      }).catch((e) => { if (!done) { done = true; clearTimeout(timer); reject(e); } });
    });
  }

  /// Registers `phone` from the command line, answering with the SMS code.
  async function cliRegister(profile, phone) {
    let sent = false;
    await cli(profile, ["register", phone], undefined, (out, child) => {
      if (!sent && out.includes("A code was sent")) {
        sent = true;
        until(`the SMS code for ${phone}`, () => codes.get(phone)).then((code) => child.stdin.end(`${code}\n`));
      }
    });
  }

  return { dataDir, adminPort, base, codes, startServer, cli, cliUntil, cliRegister };
}
