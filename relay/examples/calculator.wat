;; glyph://calculator@quantum: `main` adds two i32s; `add`, `sub`, `mul`, `div` are there too.
(module
  (func $add (export "add") (param i32 i32) (result i32)
    (i32.add (local.get 0) (local.get 1)))
  (func (export "main") (param i32 i32) (result i32)
    (call $add (local.get 0) (local.get 1)))
  (func (export "sub") (param i32 i32) (result i32)
    (i32.sub (local.get 0) (local.get 1)))
  (func (export "mul") (param i32 i32) (result i32)
    (i32.mul (local.get 0) (local.get 1)))
  ;; Traps on division by zero: try it to see error code `trap`.
  (func (export "div") (param i32 i32) (result i32)
    (i32.div_s (local.get 0) (local.get 1))))
