/**
 * The bytes fed to a parser and not consumed yet: a queue of chunks read without copying, with
 * a running count of consumed bytes so that every record knows its absolute stream offset
 * (the shape of tar-stream's BufferList and ws's receiver buffers).
 */
export class BufferList {
  private chunks: Buffer[] = [];
  /** Index of the first chunk with unconsumed bytes. */
  private head = 0;
  /** Consumed bytes of chunks[head]. */
  headPos = 0;
  /** Unconsumed bytes in the list. */
  length = 0;
  /** Absolute stream offset of the first unconsumed byte. */
  consumed = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** The first chunk with unconsumed bytes (read it from `headPos`), or undefined when empty. */
  headChunk(): Buffer | undefined {
    return this.length ? this.chunks[this.head] : undefined;
  }

  /** The byte `index` bytes ahead; `index` must be below `length`. */
  byteAt(index: number): number {
    let i = this.head;
    let at = this.headPos + index;
    for (;;) {
      const chunk = this.chunks[i]!;
      if (at < chunk.length) return chunk[at]!;
      at -= chunk.length;
      i++;
    }
  }

  /** Exactly `n` contiguous bytes, or undefined while fewer are buffered. */
  peek(n: number): Buffer | undefined {
    return n > this.length ? undefined : this.peekUpTo(n);
  }

  /**
   * The next min(n, length) bytes as one Buffer: a view of the head chunk when it holds them,
   * else a copy of just those bytes. Valid until the next `skip`/`push`.
   */
  peekUpTo(n: number): Buffer {
    const want = Math.min(n, this.length);
    const chunk = this.chunks[this.head];
    if (!chunk) return Buffer.alloc(0);
    if (chunk.length - this.headPos >= want) return chunk.subarray(this.headPos, this.headPos + want);
    const out = Buffer.allocUnsafe(want);
    this.copyOut(out, 0, want);
    return out;
  }

  /**
   * The next `n` bytes (n ≤ length) as one Buffer and consume them: a view of the head chunk
   * when it holds them, else copied into `scratch` (which must hold n bytes).
   */
  shiftInto(n: number, scratch: Buffer): Buffer {
    const chunk = this.chunks[this.head]!;
    if (chunk.length - this.headPos >= n) {
      const view = chunk.subarray(this.headPos, this.headPos + n);
      this.skip(n);
      return view;
    }
    this.copyOut(scratch, 0, n);
    this.skip(n);
    return n === scratch.length ? scratch : scratch.subarray(0, n);
  }

  /** Up to `max` bytes from the head chunk only, consumed (for pass-through). */
  shiftChunk(max: number): Buffer {
    const chunk = this.chunks[this.head]!;
    const n = Math.min(max, chunk.length - this.headPos);
    const view = chunk.subarray(this.headPos, this.headPos + n);
    this.skip(n);
    return view;
  }

  /**
   * Copy the unconsumed bytes into one Buffer of the list's own, so that the chunks pushed so
   * far may be overwritten (a reader that reuses its read buffer). What is left between two
   * reads is usually part of one record, a few KiB at most.
   */
  detach(): void {
    if (this.length === 0) return;
    const own = Buffer.allocUnsafe(this.length);
    this.copyOut(own, 0, this.length);
    this.chunks = [own];
    this.head = 0;
    this.headPos = 0;
  }

  /** Consume `n` bytes (n ≤ length). */
  skip(n: number): void {
    this.length -= n;
    this.consumed += n;
    let pos = this.headPos + n;
    for (;;) {
      const chunk = this.chunks[this.head];
      if (!chunk || pos < chunk.length) break;
      pos -= chunk.length;
      this.head++;
    }
    this.headPos = pos;
    if (this.head > 64 || this.length === 0) {
      this.chunks.splice(0, this.head);
      this.head = 0;
    }
  }

  /** Copy the next `n` bytes into `target` at `at`, without consuming them. */
  private copyOut(target: Buffer, at: number, n: number): void {
    let i = this.head;
    let from = this.headPos;
    let left = n;
    while (left > 0) {
      const chunk = this.chunks[i++]!;
      const copied = chunk.copy(target, at, from, Math.min(chunk.length, from + left));
      at += copied;
      left -= copied;
      from = 0;
    }
  }
}
