//! Over 600 lines on purpose: the lexer, parser and evaluator of this CEL subset (and their
//! tests) change together.
//!
//! A small subset of CEL, enough for the `x-kubernetes-validations` rules CRDs usually carry:
//! literals, `self`/`oldSelf`, field access and indexing, `has()`, `size()`, `!`, `-`,
//! arithmetic, comparisons, `&&`, `||`, `? :`, `in`, list literals, the macros `all`, `exists`,
//! `exists_one`, `map`, `filter`, and the string methods `startsWith`, `endsWith`, `contains`,
//! `matches`. Anything else is `Unsupported`: the caller skips such a rule (with a warning)
//! rather than guessing.

use std::collections::HashMap;

use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq)]
pub enum CelError {
    /// The rule uses CEL that this subset does not implement.
    Unsupported(String),
    /// The rule is valid CEL but failed to evaluate (e.g. a missing field).
    Eval(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Int(i64),
    Float(f64),
    Str(String),
    Op(&'static str),
}

const OPS: &[&str] = &[
    "==", "!=", "<=", ">=", "&&", "||", "<", ">", "!", "(", ")", "[", "]", ".", ",", "?", ":", "+",
    "-", "*", "/", "%",
];

fn lex(src: &str) -> Result<Vec<Tok>, CelError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let s: String = chars[start..i].iter().collect();
            if i < chars.len() && (chars[i] == 'u' || chars[i] == 'U') {
                i += 1;
            }
            if s.contains('.') {
                out.push(Tok::Float(
                    s.parse()
                        .map_err(|_| CelError::Unsupported(format!("number {s}")))?,
                ));
            } else {
                out.push(Tok::Int(
                    s.parse()
                        .map_err(|_| CelError::Unsupported(format!("number {s}")))?,
                ));
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c == '\'' || c == '"' {
            let q = c;
            i += 1;
            let mut s = String::new();
            while i < chars.len() && chars[i] != q {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                    s.push(match chars[i] {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                } else {
                    s.push(chars[i]);
                }
                i += 1;
            }
            if i >= chars.len() {
                return Err(CelError::Unsupported("unterminated string".into()));
            }
            i += 1;
            out.push(Tok::Str(s));
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let op = OPS
                .iter()
                .find(|op| rest.starts_with(**op))
                .ok_or_else(|| CelError::Unsupported(format!("character {c:?}")))?;
            out.push(Tok::Op(op));
            i += op.len();
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
enum Expr {
    Lit(Value),
    Ident(String),
    Field(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Call(Option<Box<Expr>>, String, Vec<Expr>),
    Unary(&'static str, Box<Expr>),
    Binary(&'static str, Box<Expr>, Box<Expr>),
    Cond(Box<Expr>, Box<Expr>, Box<Expr>),
    List(Vec<Expr>),
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn eat(&mut self, op: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Op(o)) if *o == op) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, op: &str) -> Result<(), CelError> {
        if self.eat(op) {
            Ok(())
        } else {
            Err(CelError::Unsupported(format!(
                "expected {op:?} at token {}",
                self.pos
            )))
        }
    }

    fn expr(&mut self) -> Result<Expr, CelError> {
        let c = self.or()?;
        if self.eat("?") {
            let a = self.expr()?;
            self.expect(":")?;
            let b = self.expr()?;
            return Ok(Expr::Cond(Box::new(c), Box::new(a), Box::new(b)));
        }
        Ok(c)
    }

    fn or(&mut self) -> Result<Expr, CelError> {
        let mut l = self.and()?;
        while self.eat("||") {
            l = Expr::Binary("||", Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }

    fn and(&mut self) -> Result<Expr, CelError> {
        let mut l = self.rel()?;
        while self.eat("&&") {
            l = Expr::Binary("&&", Box::new(l), Box::new(self.rel()?));
        }
        Ok(l)
    }

    fn rel(&mut self) -> Result<Expr, CelError> {
        let l = self.add()?;
        for op in ["==", "!=", "<=", ">=", "<", ">"] {
            if self.eat(op) {
                return Ok(Expr::Binary(op, Box::new(l), Box::new(self.add()?)));
            }
        }
        if matches!(self.peek(), Some(Tok::Ident(i)) if i == "in") {
            self.pos += 1;
            return Ok(Expr::Binary("in", Box::new(l), Box::new(self.add()?)));
        }
        Ok(l)
    }

    fn add(&mut self) -> Result<Expr, CelError> {
        let mut l = self.mul()?;
        loop {
            if self.eat("+") {
                l = Expr::Binary("+", Box::new(l), Box::new(self.mul()?));
            } else if self.eat("-") {
                l = Expr::Binary("-", Box::new(l), Box::new(self.mul()?));
            } else {
                return Ok(l);
            }
        }
    }

    fn mul(&mut self) -> Result<Expr, CelError> {
        let mut l = self.unary()?;
        loop {
            let op = if self.eat("*") {
                "*"
            } else if self.eat("/") {
                "/"
            } else if self.eat("%") {
                "%"
            } else {
                return Ok(l);
            };
            l = Expr::Binary(op, Box::new(l), Box::new(self.unary()?));
        }
    }

    fn unary(&mut self) -> Result<Expr, CelError> {
        if self.eat("!") {
            return Ok(Expr::Unary("!", Box::new(self.unary()?)));
        }
        if self.eat("-") {
            return Ok(Expr::Unary("-", Box::new(self.unary()?)));
        }
        self.postfix()
    }

    fn args(&mut self) -> Result<Vec<Expr>, CelError> {
        let mut args = Vec::new();
        if self.eat(")") {
            return Ok(args);
        }
        loop {
            args.push(self.expr()?);
            if self.eat(")") {
                return Ok(args);
            }
            self.expect(",")?;
        }
    }

    fn postfix(&mut self) -> Result<Expr, CelError> {
        let mut e = self.primary()?;
        loop {
            if self.eat(".") {
                let Some(Tok::Ident(name)) = self.peek().cloned() else {
                    return Err(CelError::Unsupported("expected a name after '.'".into()));
                };
                self.pos += 1;
                if self.eat("(") {
                    let args = self.args()?;
                    e = Expr::Call(Some(Box::new(e)), name, args);
                } else {
                    e = Expr::Field(Box::new(e), name);
                }
            } else if self.eat("[") {
                let idx = self.expr()?;
                self.expect("]")?;
                e = Expr::Index(Box::new(e), Box::new(idx));
            } else {
                return Ok(e);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, CelError> {
        let tok = self
            .peek()
            .cloned()
            .ok_or_else(|| CelError::Unsupported("unexpected end of rule".into()))?;
        self.pos += 1;
        match tok {
            Tok::Int(n) => Ok(Expr::Lit(json!(n))),
            Tok::Float(f) => Ok(Expr::Lit(json!(f))),
            Tok::Str(s) => Ok(Expr::Lit(Value::String(s))),
            Tok::Ident(id) => match id.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "null" => Ok(Expr::Lit(Value::Null)),
                _ if self.eat("(") => Ok(Expr::Call(None, id, self.args()?)),
                _ => Ok(Expr::Ident(id)),
            },
            Tok::Op("(") => {
                let e = self.expr()?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Op("[") => {
                let mut items = Vec::new();
                if !self.eat("]") {
                    loop {
                        items.push(self.expr()?);
                        if self.eat("]") {
                            break;
                        }
                        self.expect(",")?;
                    }
                }
                Ok(Expr::List(items))
            }
            other => Err(CelError::Unsupported(format!("unexpected {other:?}"))),
        }
    }
}

/// Whether a rule mentions `oldSelf` (a transition rule, only checked on update).
pub fn is_transition_rule(rule: &str) -> bool {
    lex(rule).is_ok_and(|t| t.iter().any(|t| *t == Tok::Ident("oldSelf".into())))
}

/// Evaluates `rule` with `self` (and `oldSelf`) bound; Ok(true) means the rule holds.
pub fn eval_rule(rule: &str, self_: &Value, old_self: Option<&Value>) -> Result<bool, CelError> {
    let toks = lex(rule)?;
    let mut p = Parser { toks, pos: 0 };
    let e = p.expr()?;
    if p.pos != p.toks.len() {
        return Err(CelError::Unsupported(format!(
            "trailing input at token {}",
            p.pos
        )));
    }
    let mut env = HashMap::new();
    env.insert("self".to_string(), self_.clone());
    if let Some(o) = old_self {
        env.insert("oldSelf".to_string(), o.clone());
    }
    match eval(&e, &env)? {
        Value::Bool(b) => Ok(b),
        other => Err(CelError::Eval(format!("rule returned {other}, not a bool"))),
    }
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn eq(a: &Value, b: &Value) -> bool {
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn truthy(v: Value, what: &str) -> Result<bool, CelError> {
    v.as_bool()
        .ok_or_else(|| CelError::Eval(format!("{what}: expected a bool, got {v}")))
}

fn size(v: &Value) -> Result<Value, CelError> {
    match v {
        Value::String(s) => Ok(json!(s.chars().count())),
        Value::Array(a) => Ok(json!(a.len())),
        Value::Object(m) => Ok(json!(m.len())),
        other => Err(CelError::Eval(format!("size() of {other}"))),
    }
}

fn eval(e: &Expr, env: &HashMap<String, Value>) -> Result<Value, CelError> {
    match e {
        Expr::Lit(v) => Ok(v.clone()),
        Expr::Ident(id) => env
            .get(id)
            .cloned()
            .ok_or_else(|| CelError::Unsupported(format!("unknown identifier {id}"))),
        Expr::List(items) => Ok(Value::Array(
            items
                .iter()
                .map(|i| eval(i, env))
                .collect::<Result<_, _>>()?,
        )),
        Expr::Field(obj, f) => {
            let o = eval(obj, env)?;
            o.get(f)
                .cloned()
                .ok_or_else(|| CelError::Eval(format!("no such key: {f}")))
        }
        Expr::Index(obj, idx) => {
            let o = eval(obj, env)?;
            let i = eval(idx, env)?;
            let r = match (&o, &i) {
                (Value::Array(a), Value::Number(n)) => {
                    n.as_u64().and_then(|n| a.get(n as usize)).cloned()
                }
                (Value::Object(m), Value::String(k)) => m.get(k).cloned(),
                _ => None,
            };
            r.ok_or_else(|| CelError::Eval(format!("no such key: {i}")))
        }
        Expr::Unary(op, x) => {
            let v = eval(x, env)?;
            match *op {
                "!" => Ok(Value::Bool(!truthy(v, "!")?)),
                _ => match v.as_i64() {
                    Some(n) => Ok(json!(-n)),
                    None => num(&v)
                        .map(|f| json!(-f))
                        .ok_or_else(|| CelError::Eval("negation of a non-number".into())),
                },
            }
        }
        Expr::Cond(c, a, b) => {
            if truthy(eval(c, env)?, "?:")? {
                eval(a, env)
            } else {
                eval(b, env)
            }
        }
        Expr::Binary(op, l, r) => binary(op, l, r, env),
        Expr::Call(recv, name, args) => call(recv.as_deref(), name, args, env),
    }
}

fn binary(op: &str, l: &Expr, r: &Expr, env: &HashMap<String, Value>) -> Result<Value, CelError> {
    if op == "&&" || op == "||" {
        // CEL's logical operators tolerate an error on one side when the other decides.
        let lv = eval(l, env).and_then(|v| truthy(v, op));
        if let Ok(b) = lv
            && ((op == "&&" && !b) || (op == "||" && b))
        {
            return Ok(Value::Bool(b));
        }
        let rv = eval(r, env).and_then(|v| truthy(v, op))?;
        let lb = lv?;
        return Ok(Value::Bool(if op == "&&" { lb && rv } else { lb || rv }));
    }
    let a = eval(l, env)?;
    let b = eval(r, env)?;
    let cmp = |f: fn(std::cmp::Ordering) -> bool| -> Result<Value, CelError> {
        let ord = match (&a, &b) {
            (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
            _ => match (num(&a), num(&b)) {
                (Some(x), Some(y)) => x.partial_cmp(&y),
                _ => None,
            },
        };
        ord.map(|o| Value::Bool(f(o)))
            .ok_or_else(|| CelError::Eval(format!("cannot compare {a} and {b}")))
    };
    match op {
        "==" => Ok(Value::Bool(eq(&a, &b))),
        "!=" => Ok(Value::Bool(!eq(&a, &b))),
        "<" => cmp(|o| o.is_lt()),
        "<=" => cmp(|o| o.is_le()),
        ">" => cmp(|o| o.is_gt()),
        ">=" => cmp(|o| o.is_ge()),
        "in" => match &b {
            Value::Array(items) => Ok(Value::Bool(items.iter().any(|x| eq(x, &a)))),
            Value::Object(m) => Ok(Value::Bool(a.as_str().is_some_and(|k| m.contains_key(k)))),
            _ => Err(CelError::Eval("'in' needs a list or map".into())),
        },
        "+" => match (&a, &b) {
            (Value::String(x), Value::String(y)) => Ok(Value::String(format!("{x}{y}"))),
            (Value::Array(x), Value::Array(y)) => {
                Ok(Value::Array(x.iter().chain(y).cloned().collect()))
            }
            _ => arith(op, &a, &b),
        },
        _ => arith(op, &a, &b),
    }
}

fn arith(op: &str, a: &Value, b: &Value) -> Result<Value, CelError> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        let r = match op {
            "+" => x.checked_add(y),
            "-" => x.checked_sub(y),
            "*" => x.checked_mul(y),
            "/" => x.checked_div(y),
            "%" => x.checked_rem(y),
            _ => None,
        };
        return r.map(|n| json!(n)).ok_or_else(|| {
            CelError::Eval(format!("integer overflow or division by zero in {op}"))
        });
    }
    match (num(a), num(b)) {
        (Some(x), Some(y)) => Ok(json!(match op {
            "+" => x + y,
            "-" => x - y,
            "*" => x * y,
            "/" => x / y,
            _ => return Err(CelError::Unsupported(format!("{op} on doubles"))),
        })),
        _ => Err(CelError::Eval(format!("{op} on {a} and {b}"))),
    }
}

fn call(
    recv: Option<&Expr>,
    name: &str,
    args: &[Expr],
    env: &HashMap<String, Value>,
) -> Result<Value, CelError> {
    match (recv, name) {
        (None, "has") => {
            let [Expr::Field(obj, f)] = args else {
                return Err(CelError::Unsupported(
                    "has() needs a field selection".into(),
                ));
            };
            let o = eval(obj, env)?;
            Ok(Value::Bool(o.get(f).is_some_and(|v| !v.is_null())))
        }
        (None, "size") => {
            let [x] = args else {
                return Err(CelError::Unsupported("size() arity".into()));
            };
            size(&eval(x, env)?)
        }
        (None, "int") => {
            let [x] = args else {
                return Err(CelError::Unsupported("int() arity".into()));
            };
            let v = eval(x, env)?;
            match &v {
                Value::String(s) => s
                    .parse::<i64>()
                    .map(|n| json!(n))
                    .map_err(|_| CelError::Eval(format!("int({s:?})"))),
                _ => num(&v)
                    .map(|f| json!(f as i64))
                    .ok_or_else(|| CelError::Eval(format!("int({v})"))),
            }
        }
        (None, "string") => {
            let [x] = args else {
                return Err(CelError::Unsupported("string() arity".into()));
            };
            let v = eval(x, env)?;
            Ok(Value::String(match v {
                Value::String(s) => s,
                other => other.to_string(),
            }))
        }
        (Some(r), "size") if args.is_empty() => size(&eval(r, env)?),
        (Some(r), m @ ("all" | "exists" | "exists_one" | "map" | "filter")) => {
            let [Expr::Ident(var), body] = args else {
                return Err(CelError::Unsupported(format!("{m}() needs (var, expr)")));
            };
            let coll = eval(r, env)?;
            let items: Vec<Value> = match coll {
                Value::Array(a) => a,
                Value::Object(m) => m.keys().map(|k| Value::String(k.clone())).collect(),
                other => return Err(CelError::Eval(format!("{m}() on {other}"))),
            };
            let mut env2 = env.clone();
            let mut results = Vec::new();
            for it in &items {
                env2.insert(var.clone(), it.clone());
                results.push(eval(body, &env2)?);
            }
            let bools = || -> Result<Vec<bool>, CelError> {
                results.iter().map(|v| truthy(v.clone(), m)).collect()
            };
            match m {
                "all" => Ok(Value::Bool(bools()?.iter().all(|b| *b))),
                "exists" => Ok(Value::Bool(bools()?.iter().any(|b| *b))),
                "exists_one" => Ok(Value::Bool(bools()?.iter().filter(|b| **b).count() == 1)),
                "map" => Ok(Value::Array(results)),
                _ => Ok(Value::Array(
                    items
                        .into_iter()
                        .zip(bools()?)
                        .filter(|(_, b)| *b)
                        .map(|(i, _)| i)
                        .collect(),
                )),
            }
        }
        (Some(r), m @ ("startsWith" | "endsWith" | "contains" | "matches")) => {
            let s = eval(r, env)?;
            let [a] = args else {
                return Err(CelError::Unsupported(format!("{m}() arity")));
            };
            let a = eval(a, env)?;
            let (Some(s), Some(a)) = (s.as_str(), a.as_str()) else {
                return Err(CelError::Eval(format!("{m}() needs strings")));
            };
            Ok(Value::Bool(match m {
                "startsWith" => s.starts_with(a),
                "endsWith" => s.ends_with(a),
                "contains" => s.contains(a),
                _ => regex::Regex::new(a)
                    .map_err(|e| CelError::Eval(format!("bad regex {a:?}: {e}")))?
                    .is_match(s),
            }))
        }
        _ => Err(CelError::Unsupported(format!("function {name}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_of_the_agentrun_crd() {
        let spec = json!({"variations": [{"name": "a"}, {"name": "b"}], "parallelism": 2});
        let r = "!has(self.parallelism) || self.parallelism <= (has(self.variations) && size(self.variations) > 0 ? size(self.variations) : 1)";
        assert_eq!(eval_rule(r, &spec, None), Ok(true));
        assert_eq!(eval_rule(r, &json!({"parallelism": 2}), None), Ok(false));
        assert_eq!(eval_rule(r, &json!({}), None), Ok(true));
        let uniq = "self.all(v, self.exists_one(w, w.name == v.name))";
        assert_eq!(eval_rule(uniq, &spec["variations"], None), Ok(true));
        assert_eq!(
            eval_rule(uniq, &json!([{"name": "a"}, {"name": "a"}]), None),
            Ok(false)
        );
        assert_eq!(
            eval_rule("self == oldSelf", &json!(["x"]), Some(&json!(["x"]))),
            Ok(true)
        );
        assert_eq!(
            eval_rule("self == oldSelf", &json!("a"), Some(&json!("b"))),
            Ok(false)
        );
        assert!(is_transition_rule("self == oldSelf"));
        assert_eq!(
            eval_rule(
                "size(self.metadata.name) <= 42",
                &json!({"metadata": {"name": "x"}}),
                None
            ),
            Ok(true)
        );
        assert_eq!(
            eval_rule(
                "self.name.startsWith('a') && 'b' in ['a', 'b']",
                &json!({"name": "ab"}),
                None
            ),
            Ok(true)
        );
        assert!(matches!(
            eval_rule("self.quantity(1)", &json!({}), None),
            Err(CelError::Unsupported(_))
        ));
        assert!(matches!(
            eval_rule("self.missing == 1", &json!({}), None),
            Err(CelError::Eval(_))
        ));
    }
}
