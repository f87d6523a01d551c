;; glyph://echo: a WASI command that copies stdin to stdout. Relay writes the request's `inputs`
;; to stdin as JSON and decodes stdout as JSON, so the output is the inputs, unchanged.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  ;; [0, 8): one iovec (pointer, length); [8, 12): bytes moved; [1024, 131072): the buffer.
  (memory (export "memory") 2)
  (func (export "_start")
    (local $end i32)
    (local.set $end (i32.const 1024))
    (block $eof
      (loop $read
        (i32.store (i32.const 0) (local.get $end))
        (i32.store (i32.const 4) (i32.sub (i32.const 131072) (local.get $end)))
        (br_if $eof (i32.eqz (i32.load (i32.const 4))))
        (i32.store (i32.const 8) (i32.const 0))
        (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $eof (i32.eqz (i32.load (i32.const 8))))
        (local.set $end (i32.add (local.get $end) (i32.load (i32.const 8))))
        (br $read)))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.sub (local.get $end) (i32.const 1024)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
