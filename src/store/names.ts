import { StoreError } from './errors.js';

const NAME = /^[A-Za-z0-9._-]{1,64}$/;

/**
 * A snapshot name from a user or the network: 1–64 of [A-Za-z0-9._-], not `.` or `..`. Names
 * never become paths (snapshot files are named by id), so this is the whole check.
 */
export function checkName(name: string): string {
  if (NAME.test(name) && name !== '.' && name !== '..') return name;
  throw new StoreError('QSNAP_STORE_NAME', `"${printable(name)}" is not a snapshot name`, {
    hint: 'use 1 to 64 letters, digits, dots, dashes or underscores (not . or ..)',
    details: { name: printable(name) },
  });
}

/** A name as it can be shown on one line (control characters escaped, long names cut). */
function printable(name: string): string {
  const shown = JSON.stringify(name).slice(1, -1);
  return shown.length > 80 ? `${shown.slice(0, 77)}...` : shown;
}
