/**
 * `qsnap status` and the CLI's error contract, through the built CLI as a child process
 * (see test/support/build.ts for when it builds dist/ itself). A real QEMU with two disks (one
 * read-only) and no guest is the peer; fake unix servers stand in for sockets that are not QMP.
 *
 * The contract: a failure prints one line `qsnap: <message> — <hint> [CODE]` on stderr and
 * exits 1 (2 for usage errors); with --json the same error is an object on stdout.
 */
import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Vm } from '../../src/vm/launcher.js';
import { ensureBuilt } from '../support/build.js';
import { type CliResult, runCli } from '../support/cli.js';
import { hasQemu, hasQemuImg, ROOT } from '../support/env.js';
import { killPid } from '../support/process.js';

const run = promisify(execFile);

/** Every command the source defines: one file each in src/cli/commands. */
const COMMANDS = readdirSync(join(ROOT, 'src', 'cli', 'commands'))
  .filter((f) => f.endsWith('.ts'))
  .map((f) => f.slice(0, -3));

let tmp: string;
let env: NodeJS.ProcessEnv;

beforeAll(async () => {
  ensureBuilt();
  tmp = await mkdtemp(join(tmpdir(), 'qsnap-cli-test-'));
  // Intent records (engine/intent.ts) go here, not into the user's state directory.
  env = { QSNAP_STATE_DIR: join(tmp, 'state') };
});

afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** The one stderr line of a failed run, checked for the `qsnap: … — … [CODE]` shape. */
function errorLine(result: CliResult, code: string): string {
  const lines = result.stderr.trimEnd().split('\n');
  expect(lines, result.stderr).toHaveLength(1);
  const line = lines[0]!;
  expect(line.startsWith('qsnap: '), line).toBe(true);
  expect(line.endsWith(` [${code}]`), line).toBe(true);
  expect(line).toContain(' — ');
  return line;
}

interface JsonError {
  ok: false;
  error: { code: string; message: string; hint?: string; details?: Record<string, unknown> };
}

describe('help and usage', () => {
  it('--help exits 0 and lists every command', async () => {
    expect(COMMANDS).toContain('status');
    const result = await runCli(['--help']);
    expect(result.code).toBe(0);
    for (const command of COMMANDS) expect(result.stdout).toMatch(new RegExp(`^  ${command} `, 'm'));
  });

  it('prints the usage and exits 2 without a command', async () => {
    const result = await runCli([]);
    expect(result.code).toBe(2);
    expect(result.stdout).toContain('Usage: qsnap');
  });

  it.each(COMMANDS)('%s --help exits 0 with its usage', async (command) => {
    const result = await runCli([command, '--help']);
    expect(result.code, result.stderr).toBe(0);
    expect(result.stdout).toContain(`Usage: qsnap ${command}`);
  });

  it('status --help names its options', async () => {
    const result = await runCli(['status', '--help']);
    expect(result.code).toBe(0);
    expect(result.stdout).toContain('--qmp <value>');
    expect(result.stdout).toContain('--json');
  });

  it('refuses an unknown command with exit 2', async () => {
    const result = await runCli(['frobnicate']);
    expect(result.code).toBe(2);
    errorLine(result, 'QSNAP_USAGE');
  });

  it('refuses status without --qmp with exit 2 QSNAP_USAGE', async () => {
    const result = await runCli(['status'], env);
    expect(result.code).toBe(2);
    errorLine(result, 'QSNAP_USAGE');
  });

  it('refuses an unknown option with exit 2 QSNAP_USAGE', async () => {
    const result = await runCli(['status', '--qmp', '/x', '--bogus'], env);
    expect(result.code).toBe(2);
    errorLine(result, 'QSNAP_USAGE');
  });

  it('reports a usage error as JSON with --json', async () => {
    const result = await runCli(['status', '--json'], env);
    expect(result.code).toBe(2);
    expect((JSON.parse(result.stdout) as JsonError).error.code).toBe('QSNAP_USAGE');
  });
});

describe('status: sockets that are not a VM', () => {
  const servers: Server[] = [];

  afterAll(async () => {
    for (const server of servers) await new Promise((ok) => server.close(ok));
  });

  async function fakeServer(name: string, onConnect: (socket: import('node:net').Socket) => void) {
    const path = join(tmp, name);
    const server = createServer(onConnect);
    servers.push(server);
    await new Promise<void>((ok, fail) => {
      server.once('error', fail);
      server.listen(path, ok);
    });
    return path;
  }

  it('fails with exit 1 and one [QSNAP_QMP_CONNECT] line when nothing is at the path', async () => {
    const result = await runCli(['status', '--qmp', join(tmp, 'no-such.sock')], env);
    expect(result.code).toBe(1);
    expect(result.stdout).toBe('');
    errorLine(result, 'QSNAP_QMP_CONNECT');
  });

  it('fails the same way when the path is a regular file', async () => {
    const file = join(tmp, 'plain-file');
    await writeFile(file, 'not a socket\n');
    const result = await runCli(['status', '--qmp', file], env);
    expect(result.code).toBe(1);
    errorLine(result, 'QSNAP_QMP_CONNECT');
  });

  it('fails with QSNAP_QMP_CONNECT when the server sends something that is not QMP', async () => {
    const path = await fakeServer('garbage.sock', (socket) => socket.end('SSH-2.0-OpenSSH_9.2\r\n'));
    const result = await runCli(['status', '--qmp', path], env);
    expect(result.code).toBe(1);
    errorLine(result, 'QSNAP_QMP_CONNECT');
  });

  it('fails with QSNAP_QMP_CONNECT when the server says nothing', async () => {
    const path = await fakeServer('silent.sock', () => undefined);
    const result = await runCli(['status', '--qmp', path, '--json'], env);
    expect(result.code).toBe(1);
    const error = (JSON.parse(result.stdout) as JsonError).error;
    expect(error.code).toBe('QSNAP_QMP_CONNECT');
  });

  it('gives the error as one JSON object on stdout with --json, and nothing on stderr', async () => {
    const target = join(tmp, 'no-such.sock');
    const result = await runCli(['status', '--qmp', target, '--json'], env);
    expect(result.code).toBe(1);
    expect(result.stderr).toBe('');
    const parsed = JSON.parse(result.stdout) as JsonError;
    expect(parsed.ok).toBe(false);
    expect(parsed.error).toMatchObject({
      code: 'QSNAP_QMP_CONNECT',
      message: expect.any(String),
      hint: expect.any(String),
      details: { reason: 'no-socket', target },
    });
  });
});

interface StatusJson {
  ok: true;
  qmp: string;
  runState: string;
  running: boolean;
  qemu: { version: { major: number; minor: number; micro: number }; text: string; package: string };
  machine: string;
  accel: string;
  name?: string;
  ramBytes: number;
  disks: { device: string; nodeName?: string; file?: string; format?: string; readOnly: boolean }[];
}

describe.skipIf(!hasQemu || !hasQemuImg)('status of a real VM', () => {
  let vm: Vm | undefined;
  let rwDisk: string;
  let roDisk: string;

  beforeAll(async () => {
    rwDisk = join(tmp, 'root.qcow2');
    roDisk = join(tmp, 'data.raw');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', rwDisk, '32M']);
    await run('qemu-img', ['create', '-q', '-f', 'raw', roDisk, '8M']);
    vm = await Vm.launch({
      name: 'qsnap-cli-test',
      memoryMiB: 64,
      accel: 'tcg',
      serial: 'none',
      disks: [
        { file: rwDisk, format: 'qcow2' },
        { file: roDisk, format: 'raw', nodeName: 'data', readOnly: true },
      ],
    });
  });

  afterAll(async () => {
    const pid = vm?.pid;
    try {
      await vm?.stop();
    } finally {
      await killPid(pid);
    }
  });

  async function statusJson(): Promise<StatusJson> {
    const result = await runCli(['status', '--qmp', vm!.qmpPath, '--json'], env);
    expect(result.code, result.stderr).toBe(0);
    return JSON.parse(result.stdout) as StatusJson;
  }

  it('prints run state, QEMU version, machine, RAM and every disk as text', async () => {
    const version = await vm!.qmp.execute('query-version');
    const machine = String(await vm!.qmp.execute('qom-get', { path: '/machine', property: 'type' }));
    const result = await runCli(['status', '--qmp', vm!.qmpPath], env);
    expect(result.code, result.stderr).toBe(0);
    expect(result.stderr).toBe('');
    const lines = result.stdout.trimEnd().split('\n');
    const field = (name: string) =>
      lines
        .find((l) => l.startsWith(`${name} `))
        ?.slice(name.length)
        .trim();
    expect(field('state')).toBe('running');
    const { major, minor, micro } = version.qemu;
    expect(field('QEMU')).toMatch(new RegExp(`^${major}\\.${minor}\\.${micro} \\(`));
    expect(field('machine')).toBe(`${machine.replace(/-machine$/, '')}, accel tcg, name qsnap-cli-test`);
    expect(field('RAM')).toBe('64.0 MiB');
    const diskLines = lines.slice(lines.findIndex((l) => l.startsWith('disks')) + 1);
    expect(diskLines).toHaveLength(2);
    const rw = diskLines.find((l) => l.includes(rwDisk));
    const ro = diskLines.find((l) => l.includes(roDisk));
    expect(rw?.split(/\s+/).filter(Boolean)).toEqual([
      'disk0-dev',
      'node',
      'disk0',
      'qcow2',
      'read-write',
      rwDisk,
    ]);
    expect(ro?.split(/\s+/).filter(Boolean)).toEqual([
      'data-dev',
      'node',
      'data',
      'raw',
      'read-only',
      roDisk,
    ]);
  });

  it('gives the same facts as one JSON object with --json', async () => {
    const status = await statusJson();
    const version = await vm!.qmp.execute('query-version');
    expect(status).toMatchObject({
      ok: true,
      qmp: vm!.qmpPath,
      runState: 'running',
      running: true,
      accel: 'tcg',
      name: 'qsnap-cli-test',
      ramBytes: 64 * 2 ** 20,
      qemu: { version: { major: version.qemu.major, minor: version.qemu.minor, micro: version.qemu.micro } },
    });
    expect(status.machine).toMatch(/^pc-i440fx-/);
    expect(status.disks).toHaveLength(2);
    expect(status.disks.find((d) => d.nodeName === 'disk0')).toMatchObject({
      device: 'disk0-dev',
      file: rwDisk,
      format: 'qcow2',
      readOnly: false,
    });
    expect(status.disks.find((d) => d.nodeName === 'data')).toMatchObject({
      device: 'data-dev',
      file: roDisk,
      format: 'raw',
      readOnly: true,
    });
  });

  it('reports the run state QEMU is in: paused while stopped, running again after cont', async () => {
    await vm!.qmp.execute('stop');
    try {
      const paused = await statusJson();
      expect(paused.runState).toBe('paused');
      expect(paused.running).toBe(false);
    } finally {
      await vm!.qmp.execute('cont');
    }
    expect((await statusJson()).runState).toBe('running');
  });

  it('leaves the public socket free for the next client', async () => {
    await statusJson();
    await statusJson();
    expect(existsSync(vm!.qmpPath)).toBe(true);
  });
});
