#!/usr/bin/env node
import { deleteCommand } from './commands/delete.js';
import { exportCommand } from './commands/export.js';
import { gcCommand } from './commands/gc.js';
import { importCommand } from './commands/import.js';
import { inspectCommand } from './commands/inspect.js';
import { listCommand } from './commands/list.js';
import { restoreCommand } from './commands/restore.js';
import { serveCommand } from './commands/serve.js';
import { snapshotCommand } from './commands/snapshot.js';
import { statusCommand } from './commands/status.js';
import { verifyCommand } from './commands/verify.js';
import { takeDaemonFlag } from './daemon.js';
import { type CliEnv, readCliEnv } from './env.js';
import { reportError } from './output.js';

interface Command {
  run: (argv: string[], env: CliEnv) => Promise<number>;
  summary: string;
}

const COMMANDS: Record<string, Command> = {
  status: { run: statusCommand, summary: 'show a running VM (state, QEMU, machine, RAM, disks)' },
  snapshot: {
    run: snapshotCommand,
    summary: 'take a live point-in-time snapshot of a running VM (--name: into the store)',
  },
  list: { run: listCommand, summary: 'list the snapshots of the store (--tree: the parent tree)' },
  inspect: { run: inspectCommand, summary: 'show what a snapshot file holds' },
  verify: { run: verifyCommand, summary: 'check every checksum of a snapshot file' },
  restore: {
    run: restoreCommand,
    summary: 'start a new QEMU from a snapshot by name or file (full or --lazy)',
  },
  delete: { run: deleteCommand, summary: 'delete snapshots of the store, merging disk layers still needed' },
  gc: { run: gcCommand, summary: 'remove what no snapshot and no VM needs any more' },
  export: {
    run: exportCommand,
    summary: 'export a snapshot: a portable bundle, or a plain QEMU migration stream',
  },
  import: { run: importCommand, summary: 'import a bundle into the store (verified before it lands)' },
  serve: {
    run: serveCommand,
    summary: 'run the daemon: many VMs, a queue per VM, a WebSocket API and a dashboard',
  },
};

function usage(): string {
  const width = Math.max(...Object.keys(COMMANDS).map((c) => c.length)) + 2;
  return [
    'Usage: qsnap <command> [options]',
    '',
    'Live snapshots of running QEMU virtual machines: the guest pauses for milliseconds,',
    'RAM streams into one restorable file in the background.',
    '',
    'Commands:',
    ...Object.entries(COMMANDS).map(([name, c]) => `  ${name.padEnd(width)}${c.summary}`),
    '',
    'Run `qsnap <command> --help` for the options of a command.',
    'With --daemon ws://127.0.0.1:PORT/v1 (or QSNAP_DAEMON), status, snapshot --name, list, restore <name>,',
    'delete and gc run in `qsnap serve` instead, with the same output.',
    '',
  ].join('\n');
}

async function version(): Promise<string> {
  const { readFile } = await import('node:fs/promises');
  const pkg = JSON.parse(await readFile(new URL('../../package.json', import.meta.url), 'utf8')) as {
    version: string;
  };
  return pkg.version;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(usage());
    return command ? 0 : 2;
  }
  if (command === '--version' || command === '-V') {
    process.stdout.write(`qsnap ${await version()}\n`);
    return 0;
  }
  const entry = Object.hasOwn(COMMANDS, command) ? COMMANDS[command] : undefined;
  if (!entry) {
    process.stderr.write(
      `qsnap: unknown command "${command}" — run qsnap --help for the list [QSNAP_USAGE]\n`,
    );
    return 2;
  }
  const dash = rest.indexOf('--');
  const json = (dash >= 0 ? rest.slice(0, dash) : rest).includes('--json');
  try {
    const { argv: args, url } = takeDaemonFlag(rest);
    const env = readCliEnv();
    return await entry.run(args, url ? { ...env, daemonUrl: url } : env);
  } catch (err) {
    return reportError(err, json);
  }
}

/**
 * A reader that closes early (`qsnap … | head -1`) is not an error: the command ends quietly
 * with its usual exit code instead of an unhandled EPIPE.
 */
function endQuietlyOnClosedPipe(stream: NodeJS.WriteStream): void {
  stream.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
    process.exit(process.exitCode ?? 0);
  });
}

endQuietlyOnClosedPipe(process.stdout);
endQuietlyOnClosedPipe(process.stderr);
main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.exitCode = reportError(err, false);
  },
);
