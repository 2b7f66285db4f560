//! The `memconv` op language: `KIND@GPA+SIZE[=BYTE]`, comma separated.
//! Only syntax is checked: GPAs and sizes pass through unchanged so tests can
//! feed the VMM bad conversions.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A doorbell round trip that converts nothing (benchmark baseline).
    Nop,
    Shared,
    Private,
    /// Fill `gpa..gpa+size` with `value` from inside the guest.
    Write,
    /// Spin until the byte at `gpa` equals `value` (a device writes it by
    /// DMA); lets a test look at the VM between two steps.
    Wait,
    /// The test device fills the range with the byte by DMA.
    DmaWrite,
    /// The test device reads the range by DMA and compares it with the byte.
    DmaRead,
    /// The guest compares the range with the byte itself.
    Check,
    /// The guest stores the byte over `size` bytes of the test device's
    /// BAR0 at offset `gpa`.
    BarWrite,
    /// The guest compares `size` bytes of BAR0 at offset `gpa` with the byte.
    BarCheck,
}

impl OpKind {
    /// Whether the op carries `=BYTE`.
    pub fn takes_value(self) -> bool {
        !matches!(self, OpKind::Nop | OpKind::Shared | OpKind::Private)
    }
}

impl OpKind {
    /// Doorbell command / op table code.
    pub fn code(self) -> u64 {
        match self {
            OpKind::Nop => 0,
            OpKind::Shared => 1,
            OpKind::Private => 2,
            OpKind::Write => 3,
            OpKind::Wait => 4,
            OpKind::DmaWrite => 5,
            OpKind::DmaRead => 6,
            OpKind::Check => 7,
            OpKind::BarWrite => 8,
            OpKind::BarCheck => 9,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub kind: OpKind,
    pub gpa: u64,
    pub size: u64,
    pub value: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty op list")]
    Empty,
    #[error("op {0:?}: expected KIND@GPA+SIZE")]
    Shape(String),
    #[error(
        "op {0:?}: unknown kind (nop, shared, private, write, wait, dma-write, dma-read, check, bar-write, bar-check)"
    )]
    Kind(String),
    #[error("invalid number {0:?}")]
    Number(String),
    #[error("invalid size {0:?} (a number with an optional K, M, G or T suffix)")]
    Size(String),
    #[error("op {0:?}: all but nop, shared and private need =BYTE (0..=255)")]
    WriteValue(String),
    #[error("op {0:?}: nop, shared and private take no =BYTE")]
    UnexpectedValue(String),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            OpKind::Nop => "nop",
            OpKind::Shared => "shared",
            OpKind::Private => "private",
            OpKind::Write => "write",
            OpKind::Wait => "wait",
            OpKind::DmaWrite => "dma-write",
            OpKind::DmaRead => "dma-read",
            OpKind::Check => "check",
            OpKind::BarWrite => "bar-write",
            OpKind::BarCheck => "bar-check",
        };
        write!(f, "{kind}@{:#x}+{:#x}", self.gpa, self.size)?;
        if self.kind.takes_value() {
            write!(f, "={:#x}", self.value)?;
        }
        Ok(())
    }
}

/// Decimal or `0x` hexadecimal.
pub fn parse_u64(text: &str) -> Result<u64, ParseError> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse::<u64>(),
    };
    parsed.map_err(|_| ParseError::Number(text.to_string()))
}

/// A number with an optional binary suffix: `4096`, `0x1000`, `16K`, `2M`, `1G`, `16T`.
pub fn parse_size(text: &str) -> Result<u64, ParseError> {
    let t = text.trim();
    let err = || ParseError::Size(text.to_string());
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        Some((i, 'T' | 't')) => (&t[..i], 40),
        Some(_) => (t, 0),
        None => return Err(err()),
    };
    let base = parse_u64(digits).map_err(|_| err())?;
    base.checked_mul(1u64 << shift).ok_or_else(err)
}

fn parse_op(text: &str) -> Result<Op, ParseError> {
    let shape = || ParseError::Shape(text.to_string());
    let (kind, rest) = text.split_once('@').ok_or_else(shape)?;
    let kind = match kind.trim() {
        "nop" => OpKind::Nop,
        "shared" => OpKind::Shared,
        "private" => OpKind::Private,
        "write" => OpKind::Write,
        "wait" => OpKind::Wait,
        "dma-write" => OpKind::DmaWrite,
        "dma-read" => OpKind::DmaRead,
        "check" => OpKind::Check,
        "bar-write" => OpKind::BarWrite,
        "bar-check" => OpKind::BarCheck,
        _ => return Err(ParseError::Kind(text.to_string())),
    };
    let (range, value) = match rest.split_once('=') {
        Some((range, value)) => (range, Some(value)),
        None => (rest, None),
    };
    let (gpa, size) = range.split_once('+').ok_or_else(shape)?;
    let value = match (kind.takes_value(), value) {
        (true, Some(v)) => {
            u8::try_from(parse_u64(v)?).map_err(|_| ParseError::WriteValue(text.to_string()))?
        }
        (true, None) => return Err(ParseError::WriteValue(text.to_string())),
        (false, Some(_)) => return Err(ParseError::UnexpectedValue(text.to_string())),
        (false, None) => 0,
    };
    Ok(Op {
        kind,
        gpa: parse_u64(gpa)?,
        size: parse_size(size)?,
        value,
    })
}

pub fn parse_ops(text: &str) -> Result<Vec<Op>, ParseError> {
    if text.trim().is_empty() {
        return Err(ParseError::Empty);
    }
    text.split(',').map(|op| parse_op(op.trim())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_issue_example() {
        let ops = parse_ops("shared@0x200000+16K,private@0x201000+4K").unwrap();
        assert_eq!(
            ops,
            vec![
                Op {
                    kind: OpKind::Shared,
                    gpa: 0x20_0000,
                    size: 0x4000,
                    value: 0
                },
                Op {
                    kind: OpKind::Private,
                    gpa: 0x20_1000,
                    size: 0x1000,
                    value: 0
                },
            ]
        );
    }

    #[test]
    fn decimal_suffixes_and_writes() {
        let ops = parse_ops("shared@16777216+2M, write@0x1000000+1G=255").unwrap();
        assert_eq!(ops[0].gpa, 16 << 20);
        assert_eq!(ops[0].size, 2 << 20);
        assert_eq!(ops[1].kind, OpKind::Write);
        assert_eq!(ops[1].size, 1 << 30);
        assert_eq!(ops[1].value, 255);
        assert_eq!(parse_size("16T").unwrap(), 16 << 40);
    }

    #[test]
    fn bad_values_pass_through_unchanged() {
        let ops = parse_ops("shared@0x1001+0,private@0xffffffffffffffff+0x1000").unwrap();
        assert_eq!((ops[0].gpa, ops[0].size), (0x1001, 0));
        assert_eq!(ops[1].gpa, u64::MAX);
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert_eq!(parse_ops(""), Err(ParseError::Empty));
        assert!(matches!(parse_ops("shared"), Err(ParseError::Shape(_))));
        assert!(matches!(
            parse_ops("shared@0x1000"),
            Err(ParseError::Shape(_))
        ));
        assert!(matches!(
            parse_ops("swap@0x1000+4K"),
            Err(ParseError::Kind(_))
        ));
        assert!(matches!(
            parse_ops("shared@0xZZ+4K"),
            Err(ParseError::Number(_))
        ));
        assert!(matches!(
            parse_ops("shared@0x1000+4Q"),
            Err(ParseError::Size(_))
        ));
        assert!(matches!(
            parse_ops("shared@0x1000+99999999999T"),
            Err(ParseError::Size(_))
        ));
        assert!(matches!(
            parse_ops("write@0x1000+4K"),
            Err(ParseError::WriteValue(_))
        ));
        assert!(matches!(
            parse_ops("write@0x1000+4K=256"),
            Err(ParseError::WriteValue(_))
        ));
        assert!(matches!(
            parse_ops("shared@0x1000+4K=1"),
            Err(ParseError::UnexpectedValue(_))
        ));
    }

    #[test]
    fn display_round_trips() {
        let text = "shared@0x1000000+0x4000,write@0x1000000+0x10=0xab";
        let ops = parse_ops(text).unwrap();
        let again: Vec<String> = ops.iter().map(Op::to_string).collect();
        assert_eq!(again.join(","), text);
    }
}
