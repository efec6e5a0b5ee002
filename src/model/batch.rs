//! Arrow batch building.
//!
//! Codecs push readings into plain column vectors (no per-reading allocation, and a failed message
//! can be rolled back by truncation, which Arrow's builders cannot do); the sealing stage turns
//! the vectors into a `RecordBatch` without copying them.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, DictionaryArray, Float64Array, Int32Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt16Array, UInt64Array,
};
use arrow_buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::ArrowError;

use crate::model::reading::{schema, Metric, Reading, CATALOGUE};

/// One reading on its way into a batch, borrowed from the decoder's buffers.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub ts: i64,
    pub received: i64,
    pub source: &'a str,
    pub subject: Option<&'a str>,
    pub metric: Metric,
    pub value: Option<f64>,
    pub text: Option<&'a str>,
    pub flags: u16,
}

/// A string dictionary local to one batch.
#[derive(Debug, Default)]
struct Dict {
    index: HashMap<Box<str>, i32>,
    values: Vec<Box<str>>,
    /// Heap bytes of both copies of every value, with their bookkeeping.
    bytes: usize,
}

impl Dict {
    fn intern(&mut self, s: &str) -> i32 {
        if let Some(&k) = self.index.get(s) {
            return k;
        }
        let k = self.values.len() as i32;
        self.values.push(s.into());
        self.index.insert(s.into(), k);
        self.bytes += 2 * (s.len() + 32);
        k
    }

    fn get(&self, key: i32) -> &str {
        &self.values[key as usize]
    }

    fn into_array(self) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(self.values.iter()))
    }
}

/// The columns of one batch as plain vectors.
#[derive(Debug, Default)]
pub struct Columns {
    pub seq: Vec<u64>,
    pub ts: Vec<i64>,
    pub received: Vec<i64>,
    source_keys: Vec<i32>,
    source: Dict,
    /// -1 where the reading has no subject.
    subject_keys: Vec<i32>,
    subject: Dict,
    metric: Vec<u8>,
    value: Vec<f64>,
    value_valid: Vec<bool>,
    text_offsets: Vec<i32>,
    text_bytes: Vec<u8>,
    text_valid: Vec<bool>,
    flags: Vec<u16>,
}

/// A borrowed view of one row, for the alarm engine.
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    pub seq: u64,
    pub ts: i64,
    pub received: i64,
    pub source: &'a str,
    pub subject: Option<&'a str>,
    pub metric: Metric,
    pub value: Option<f64>,
    pub flags: u16,
}

impl Columns {
    fn with_capacity(n: usize) -> Self {
        let mut c = Columns {
            seq: Vec::with_capacity(n),
            ts: Vec::with_capacity(n),
            received: Vec::with_capacity(n),
            source_keys: Vec::with_capacity(n),
            subject_keys: Vec::with_capacity(n),
            metric: Vec::with_capacity(n),
            value: Vec::with_capacity(n),
            value_valid: Vec::with_capacity(n),
            text_offsets: Vec::with_capacity(n + 1),
            text_valid: Vec::with_capacity(n),
            flags: Vec::with_capacity(n),
            ..Default::default()
        };
        c.text_offsets.push(0);
        c
    }

    pub fn len(&self) -> usize {
        self.seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }

    /// Roughly how many bytes the readings take: fixed-width columns, text, and the strings of
    /// the source and subject dictionaries (twice: the index holds a copy). Bounds batches and
    /// the queues that hold them in bytes.
    pub fn approx_bytes(&self) -> usize {
        const FIXED: usize = 8 + 8 + 8 + 4 + 4 + 1 + 8 + 1 + 4 + 1 + 2;
        self.len() * FIXED + self.text_bytes.len() + self.source.bytes + self.subject.bytes
    }

    pub fn row(&self, i: usize) -> RowRef<'_> {
        RowRef {
            seq: self.seq[i],
            ts: self.ts[i],
            received: self.received[i],
            source: self.source.get(self.source_keys[i]),
            subject: match self.subject_keys[i] {
                -1 => None,
                k => Some(self.subject.get(k)),
            },
            metric: Metric::from_index(self.metric[i] as usize).expect("metric index"),
            value: self.value_valid[i].then_some(self.value[i]),
            flags: self.flags[i],
        }
    }

    /// The text of row `i`, if it has one.
    pub fn text(&self, i: usize) -> Option<&str> {
        if !self.text_valid[i] {
            return None;
        }
        let (a, b) = (
            self.text_offsets[i] as usize,
            self.text_offsets[i + 1] as usize,
        );
        std::str::from_utf8(&self.text_bytes[a..b]).ok()
    }

    fn truncate(&mut self, len: usize) {
        self.seq.truncate(len);
        self.ts.truncate(len);
        self.received.truncate(len);
        self.source_keys.truncate(len);
        self.subject_keys.truncate(len);
        self.metric.truncate(len);
        self.value.truncate(len);
        self.value_valid.truncate(len);
        self.text_offsets.truncate(len + 1);
        self.text_bytes
            .truncate(*self.text_offsets.last().unwrap_or(&0) as usize);
        self.text_valid.truncate(len);
        self.flags.truncate(len);
    }

    /// Converts the vectors into a `RecordBatch` of [`schema()`], moving (not copying) the
    /// fixed-width columns.
    pub fn into_record_batch(self) -> Result<RecordBatch, ArrowError> {
        fn nulls(valid: Vec<bool>) -> Option<NullBuffer> {
            let n = NullBuffer::from(valid);
            (n.null_count() > 0).then_some(n)
        }
        fn dict(keys: Vec<i32>, values: ArrayRef) -> Result<ArrayRef, ArrowError> {
            let keys = Int32Array::from(keys);
            Ok(Arc::new(DictionaryArray::<Int32Type>::try_new(
                keys, values,
            )?))
        }
        let catalogue_names: ArrayRef = Arc::new(StringArray::from_iter_values(
            CATALOGUE.iter().map(|m| m.name),
        ));
        let catalogue_units: ArrayRef = Arc::new(StringArray::from_iter_values(
            CATALOGUE.iter().map(|m| m.unit),
        ));
        let metric_keys: Vec<i32> = self.metric.iter().map(|&m| m as i32).collect();

        let subject_valid: Vec<bool> = self.subject_keys.iter().map(|&k| k >= 0).collect();
        let subject_keys: Vec<i32> = self.subject_keys.iter().map(|&k| k.max(0)).collect();
        let subject_values = if self.subject.values.is_empty() {
            // A null key still needs a valid index into the dictionary.
            Arc::new(StringArray::from_iter_values([""])) as ArrayRef
        } else {
            self.subject.into_array()
        };
        let subject = DictionaryArray::<Int32Type>::try_new(
            Int32Array::new(ScalarBuffer::from(subject_keys), nulls(subject_valid)),
            subject_values,
        )?;

        let text = StringArray::try_new(
            OffsetBuffer::new(ScalarBuffer::from(self.text_offsets)),
            self.text_bytes.into(),
            nulls(self.text_valid),
        )?;

        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(self.seq)),
            Arc::new(TimestampMicrosecondArray::from(self.ts).with_timezone("UTC")),
            Arc::new(TimestampMicrosecondArray::from(self.received).with_timezone("UTC")),
            dict(self.source_keys, self.source.into_array())?,
            Arc::new(subject),
            dict(metric_keys.clone(), catalogue_names)?,
            Arc::new(Float64Array::new(
                ScalarBuffer::from(self.value),
                nulls(self.value_valid),
            )),
            Arc::new(text),
            dict(metric_keys, catalogue_units)?,
            Arc::new(UInt16Array::from(self.flags)),
        ];
        RecordBatch::try_new(schema(), columns)
    }
}

/// Builds batches of readings and hands out their seq numbers.
#[derive(Debug)]
pub struct BatchBuilder {
    next_seq: u64,
    capacity: usize,
    cols: Columns,
}

impl BatchBuilder {
    pub fn new(next_seq: u64, capacity: usize) -> Self {
        BatchBuilder {
            next_seq,
            capacity,
            cols: Columns::with_capacity(capacity),
        }
    }

    /// The seq the next pushed reading gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn len(&self) -> usize {
        self.cols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cols.is_empty()
    }

    pub fn columns(&self) -> &Columns {
        &self.cols
    }

    /// Appends a reading whose value is already in the canonical unit; returns its seq.
    pub fn push(&mut self, row: Row<'_>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let c = &mut self.cols;
        c.seq.push(seq);
        c.ts.push(row.ts);
        c.received.push(row.received);
        let source_key = c.source.intern(row.source);
        c.source_keys.push(source_key);
        let subject_key = row.subject.map_or(-1, |s| c.subject.intern(s));
        c.subject_keys.push(subject_key);
        c.metric.push(row.metric as u8);
        c.value.push(row.value.unwrap_or(0.0));
        c.value_valid.push(row.value.is_some());
        if let Some(t) = row.text {
            c.text_bytes.extend_from_slice(t.as_bytes());
        }
        c.text_offsets.push(c.text_bytes.len() as i32);
        c.text_valid.push(row.text.is_some());
        c.flags.push(row.flags);
        seq
    }

    /// Drops every reading pushed since `len` was the length, and takes back their seqs: a
    /// message that fails half-way leaves nothing behind.
    pub fn rollback(&mut self, len: usize) {
        if len < self.cols.len() {
            self.next_seq = self.cols.seq[len];
            self.cols.truncate(len);
        }
    }

    /// Takes the open batch out, leaving an empty one.
    pub fn take(&mut self) -> Columns {
        std::mem::replace(&mut self.cols, Columns::with_capacity(self.capacity))
    }
}

/// Typed access to the rows of a stored batch (a `RecordBatch` of [`schema()`]), downcast once.
pub struct BatchView<'a> {
    seq: &'a UInt64Array,
    ts: &'a TimestampMicrosecondArray,
    received: &'a TimestampMicrosecondArray,
    source: TypedDict<'a>,
    subject: TypedDict<'a>,
    metric: TypedDict<'a>,
    value: &'a Float64Array,
    text: &'a StringArray,
    unit: TypedDict<'a>,
    flags: &'a UInt16Array,
}

struct TypedDict<'a> {
    keys: &'a Int32Array,
    values: &'a StringArray,
}

impl<'a> TypedDict<'a> {
    fn new(a: &'a ArrayRef, name: &str) -> Result<Self, ArrowError> {
        let d = a
            .as_any()
            .downcast_ref::<DictionaryArray<Int32Type>>()
            .ok_or_else(|| ArrowError::SchemaError(format!("column {name} is not a dictionary")))?;
        let values = d
            .values()
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| ArrowError::SchemaError(format!("column {name} has no utf8 values")))?;
        Ok(TypedDict {
            keys: d.keys(),
            values,
        })
    }

    fn get(&self, i: usize) -> Option<&'a str> {
        use arrow_array::Array;
        if self.keys.is_null(i) {
            return None;
        }
        Some(self.values.value(self.keys.value(i) as usize))
    }
}

/// One row of a stored batch, borrowed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadingRef<'a> {
    pub seq: u64,
    pub ts: i64,
    pub received: i64,
    pub source: &'a str,
    pub subject: Option<&'a str>,
    pub metric: &'a str,
    pub value: Option<f64>,
    pub text: Option<&'a str>,
    pub unit: &'a str,
    pub flags: u16,
}

impl<'a> BatchView<'a> {
    pub fn new(batch: &'a RecordBatch) -> Result<Self, ArrowError> {
        if batch.schema() != schema() {
            return Err(ArrowError::SchemaError("not a batch of readings".into()));
        }
        fn prim<T: 'static>(batch: &RecordBatch, i: usize) -> Result<&T, ArrowError> {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<T>()
                .ok_or_else(|| ArrowError::SchemaError(format!("column {i} has the wrong type")))
        }
        Ok(BatchView {
            seq: prim(batch, 0)?,
            ts: prim(batch, 1)?,
            received: prim(batch, 2)?,
            source: TypedDict::new(batch.column(3), "source")?,
            subject: TypedDict::new(batch.column(4), "subject")?,
            metric: TypedDict::new(batch.column(5), "metric")?,
            value: prim(batch, 6)?,
            text: prim(batch, 7)?,
            unit: TypedDict::new(batch.column(8), "unit")?,
            flags: prim(batch, 9)?,
        })
    }

    pub fn len(&self) -> usize {
        self.seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }

    pub fn row(&self, i: usize) -> ReadingRef<'a> {
        use arrow_array::Array;
        ReadingRef {
            seq: self.seq.value(i),
            ts: self.ts.value(i),
            received: self.received.value(i),
            source: self.source.get(i).unwrap_or_default(),
            subject: self.subject.get(i),
            metric: self.metric.get(i).unwrap_or_default(),
            value: (!self.value.is_null(i)).then(|| self.value.value(i)),
            text: (!self.text.is_null(i)).then(|| self.text.value(i)),
            unit: self.unit.get(i).unwrap_or_default(),
            flags: self.flags.value(i),
        }
    }

    /// Every row as an owned [`Reading`]; a metric name outside the catalogue is an error.
    pub fn readings(&self) -> Result<Vec<Reading>, ArrowError> {
        (0..self.len())
            .map(|i| {
                let r = self.row(i);
                Ok(Reading {
                    seq: r.seq,
                    ts: r.ts,
                    received: r.received,
                    source: r.source.to_owned(),
                    subject: r.subject.map(str::to_owned),
                    metric: Metric::from_name(r.metric).ok_or_else(|| {
                        ArrowError::InvalidArgumentError(format!("unknown metric {}", r.metric))
                    })?,
                    value: r.value,
                    text: r.text.map(str::to_owned),
                    unit: r.unit.to_owned(),
                    flags: r.flags,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::Array;

    fn row(
        source: &str,
        subject: Option<&str>,
        metric: Metric,
        value: Option<f64>,
    ) -> Row<'static> {
        Row {
            ts: 10,
            received: 20,
            source: Box::leak(source.to_owned().into_boxed_str()),
            subject: subject.map(|s| &*Box::leak(s.to_owned().into_boxed_str())),
            metric,
            value,
            text: None,
            flags: 0,
        }
    }

    #[test]
    fn builds_a_record_batch_of_the_schema() {
        let mut b = BatchBuilder::new(7, 4);
        b.push(row("a", Some("bed1"), Metric::HeartRate, Some(72.0)));
        b.push(row("b", None, Metric::Spo2, Some(97.0)));
        b.push(Row {
            text: Some("V"),
            ..row("a", Some("bed1"), Metric::Consciousness, None)
        });
        let batch = b.take().into_record_batch().unwrap();
        assert_eq!(batch.num_rows(), 3);
        assert_eq!(batch.schema(), schema());
        let seq = batch
            .column(0)
            .as_primitive::<arrow_array::types::UInt64Type>();
        assert_eq!(seq.values(), &[7, 8, 9]);
        assert!(batch.column(4).is_null(1));
        let text = batch.column(7).as_string::<i32>();
        assert!(text.is_null(0));
        assert_eq!(text.value(2), "V");
        assert_eq!(b.next_seq(), 10);
    }

    #[test]
    fn rollback_forgets_rows_and_their_seqs() {
        let mut b = BatchBuilder::new(0, 4);
        b.push(row("a", None, Metric::HeartRate, Some(72.0)));
        let mark = b.len();
        b.push(row("a", None, Metric::HeartRate, Some(73.0)));
        b.push(Row {
            text: Some("A"),
            ..row("a", None, Metric::Consciousness, None)
        });
        b.rollback(mark);
        assert_eq!(b.len(), 1);
        assert_eq!(b.next_seq(), 1);
        b.push(Row {
            text: Some("P"),
            ..row("c", None, Metric::Consciousness, None)
        });
        let batch = b.take().into_record_batch().unwrap();
        assert_eq!(batch.column(7).as_string::<i32>().value(1), "P");
        assert_eq!(batch.num_rows(), 2);
    }
}
