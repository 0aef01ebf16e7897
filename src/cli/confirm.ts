import { createInterface } from 'node:readline/promises';
import type { Readable, Writable } from 'node:stream';
import type { StoreRestoreOptions } from '../store/restore.js';
import { printable } from './output.js';

type Confirm = NonNullable<StoreRestoreOptions['confirmCmdline']>;

/**
 * On a terminal (stdin and stderr both), an imported snapshot's command line is shown and the
 * user asked whether to run it; elsewhere (scripts, --json, pipes) nobody is asked: refused.
 */
export function terminalConfirm(json: boolean): Confirm | undefined {
  if (json || !process.stdin.isTTY || !process.stderr.isTTY) return undefined;
  return (argv, name) => askToRun(argv, name, process.stdin, process.stderr);
}

/** Show `argv` one argument per line (escaped: it is a stranger's) and ask; only "y"/"yes" runs it. */
export async function askToRun(
  argv: readonly string[],
  name: string,
  input: Readable,
  output: Writable,
): Promise<boolean> {
  output.write(`snapshot ${printable(name)} came from another machine with this QEMU command line:\n`);
  for (const arg of argv) output.write(`  ${shellQuoted(arg)}\n`);
  const prompt = createInterface({ input, output, terminal: false });
  // Input that ends (Ctrl-D) before a line is an answer too: no.
  const ended = new Promise<string>((resolve) => prompt.once('close', () => resolve('')));
  try {
    const answer = await Promise.race([prompt.question('run it? [y/N] '), ended]);
    return /^y(es)?$/i.test(answer.trim());
  } finally {
    prompt.close();
  }
}

/** An argument as a shell would need it, with anything a terminal acts on escaped. */
function shellQuoted(arg: string): string {
  if (/^[A-Za-z0-9_./:=,@%+-]+$/.test(arg)) return arg;
  return printable(`'${arg.replaceAll("'", "'\\''")}'`).replaceAll('\n', '\\n');
}
