import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { askToRun } from '../../src/cli/confirm.js';
import { printable } from '../../src/cli/output.js';

async function ask(answer: string | undefined, argv = ['qemu-system-x86_64', '-m', '256']) {
  const input = new PassThrough();
  const output = new PassThrough();
  let shown = '';
  output.on('data', (d: Buffer) => {
    shown += d.toString();
  });
  const asked = askToRun(argv, 'from-there', input, output);
  if (answer === undefined) input.end();
  else input.end(`${answer}\n`);
  return { run: await asked, shown };
}

describe('asking before running a command line from another machine', () => {
  it('runs it only on y or yes', async () => {
    for (const yes of ['y', 'Y', 'yes', ' yes ']) expect((await ask(yes)).run, yes).toBe(true);
    for (const no of ['', 'n', 'no', 'yy', 'sure']) expect((await ask(no)).run, no).toBe(false);
    expect((await ask(undefined)).run, 'input ended').toBe(false);
  });

  it('shows every argument, quoted and with what a terminal would act on escaped', async () => {
    const { shown } = await ask('n', ['qemu', '-name', "it's \u001b]0;owned\u0007", '-drive', 'file=a b']);
    expect(shown).toContain('snapshot from-there came from another machine');
    expect(shown).toContain("  'it'\\''s \\u{1b}]0;owned\\u{7}'\n");
    expect(shown).toContain("  'file=a b'\n");
    expect(
      [...shown].filter((c) => c < ' ' && c !== '\n'),
      'control characters',
    ).toEqual([]);
    expect(shown).toContain('run it? [y/N] ');
  });

  it('printable() escapes controls and bidirectional overrides, keeps newlines and other text', () => {
    expect(printable('a\u202eb\u0000c\nd é')).toBe('a\\u{202e}b\\u{0}c\nd é');
  });
});
