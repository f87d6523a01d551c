;; glyph://counter: a tally that lives in a session (POST /sessions). `add(n)` adds n and returns
;; the new total; `total()` returns it. The total is a global the module keeps to itself, and the
;; last n added is in its memory: a session keeps both between calls.
(module
  (global $total (mut i64) (i64.const 0))
  (memory 1)
  (func (export "add") (param $n i64) (result i64)
    (i64.store (i32.const 0) (local.get $n))
    (global.set $total (i64.add (global.get $total) (local.get $n)))
    (global.get $total))
  (func (export "total") (result i64) (global.get $total))
  (func (export "last") (result i64) (i64.load (i32.const 0))))
