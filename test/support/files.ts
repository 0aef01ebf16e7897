/** Sizes and file contents: what a test compares before and after an operation. */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';

export const MiB = 2 ** 20;

/** The SHA-256 of a file's contents, hex. */
export async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export interface FileState {
  size: number;
  mtimeMs: number;
  sha256: string;
}

/** A file's size, mtime and contents' hash: equal states mean the file was not touched. */
export async function fileState(file: string): Promise<FileState> {
  const st = await stat(file);
  return { size: st.size, mtimeMs: st.mtimeMs, sha256: await sha256File(file) };
}
