;; glyph://fib: `main(n)` is the n-th Fibonacci number, computed the slow recursive way, so it is
;; a handy way to burn gas and time (n = 30 costs about 20 million gas).
(module
  (func $fib (export "main") (param $n i32) (result i64)
    (if (result i64) (i32.lt_s (local.get $n) (i32.const 2))
      (then (i64.extend_i32_s (local.get $n)))
      (else (i64.add
        (call $fib (i32.sub (local.get $n) (i32.const 1)))
        (call $fib (i32.sub (local.get $n) (i32.const 2))))))))
