/**
 * docs/errors.md is the one table of error codes: every QSNAP_* name the source uses is in it
 * (as a code, a warning or an environment variable), and every name in it is used.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const ROOT = resolve(fileURLToPath(new URL('../', import.meta.url)));
const NAME = /\bQSNAP_[A-Z0-9_]*[A-Z0-9]\b/g;

function sourceNames(dir: string, found = new Set<string>()): Set<string> {
  for (const entry of readdirSync(dir)) {
    const path = join(dir, entry);
    if (statSync(path).isDirectory()) sourceNames(path, found);
    else if (path.endsWith('.ts')) for (const m of readFileSync(path, 'utf8').matchAll(NAME)) found.add(m[0]);
  }
  return found;
}

/** Names in the first column of the doc's tables. */
function documentedNames(): Set<string> {
  const doc = readFileSync(join(ROOT, 'docs/errors.md'), 'utf8');
  return new Set([...doc.matchAll(/^\| `(QSNAP_[A-Z0-9_]+)` \|/gm)].map((m) => m[1]!));
}

describe('docs/errors.md', () => {
  const inSource = sourceNames(join(ROOT, 'src'));
  const inDoc = documentedNames();

  it('documents every QSNAP_* name the source uses', () => {
    // Family prefixes in doc comments (QSNAP_FILE_*) are not names.
    const used = [...inSource].filter((n) => !n.endsWith('_'));
    expect(used.filter((n) => !inDoc.has(n))).toEqual([]);
  });

  it('documents nothing the source does not use', () => {
    expect([...inDoc].filter((n) => !inSource.has(n))).toEqual([]);
  });

  it('finds the names it checks (negative control: the scan is not empty)', () => {
    expect(inSource.has('QSNAP_SNAPSHOT_FAILED')).toBe(true);
    expect(inDoc.size).toBeGreaterThan(50);
    expect(inDoc.has('QSNAP_NO_SUCH_CODE')).toBe(false);
  });
});
