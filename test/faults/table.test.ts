/**
 * docs/faults.md is the table the last full run of the matrix observed: `make test-faults`
 * regenerates it (QSNAP_FAULTS=render, after the full run saved docs/faults/*.json); every
 * other run checks that the committed table is the one those results give.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT } from '../support/env.js';
import { renderTable } from './matrix.js';

const GROUPS = ['snapshot', 'restore', 'delete'];
const TABLE = join(ROOT, 'docs', 'faults.md');

describe('docs/faults.md', () => {
  // A full run saves the results as each file ends; the render step after it writes the table.
  it.skipIf(process.env['QSNAP_FAULTS'] === 'full')(
    'is the table rendered from the last full run’s results',
    () => {
      for (const g of GROUPS) expect(existsSync(join(ROOT, 'docs', 'faults', `${g}.json`)), g).toBe(true);
      const table = renderTable(GROUPS);
      if (process.env['QSNAP_FAULTS'] === 'render') writeFileSync(TABLE, table);
      expect(readFileSync(TABLE, 'utf8'), 'run `make test-faults` to regenerate docs/faults.md').toBe(table);
    },
  );
});
