//! YAML text to a tree of nodes that know where they are in the file.
//!
//! saphyr's loader builds the tree ([`MarkedYaml`]), but we feed it the
//! parser's events ourselves instead of calling `load_from_str`, because the
//! spec's errors need three things the plain loader does not give:
//! - Repeated keys. The loader either fails with a message that cannot say
//!   which stage was repeated, or keeps one entry and forgets where the second
//!   one was. We let it keep one and record the repeats on the side.
//! - The text as written. With `early_parse` off, scalars stay as their text
//!   and style, so `env: { V: 1.10 }` keeps `1.10` and a quoted `"30"` is not
//!   mistaken for a number.
//! - A depth limit. The parser's own `load` recurses once per nesting level,
//!   so a line of ten thousand `- ` would overflow the stack; driving the
//!   event iterator ourselves keeps the parser flat and lets us stop early.
//!
//! Aliases are expanded by copying the anchored node; [`MAX_ALIAS_NODES`]
//! bounds the copies, so a "billion laughs" file fails after a bounded
//! amount of work instead of filling memory.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use saphyr::{MarkedYaml, Scalar, YamlData, YamlLoader};
use saphyr_parser::{Event, Marker, Parser, ScanError, Span, SpannedEventReceiver};

use super::{Position, Problem};

/// Far deeper than any pipeline file needs, and shallow enough that walking
/// or dropping the tree recursively is safe.
const MAX_DEPTH: usize = 64;

/// How many nodes alias expansion may create in one file. saphyr's default,
/// set here so the bound is ours: shared `env` or `agent` blocks reused by
/// every stage of the largest allowed pipeline stay far below it.
const MAX_ALIAS_NODES: usize = 100_000;

/// A loaded file: its single document, if it has one, and its repeated keys.
/// After `compose`, the tree may hold nodes of several files (each node's
/// markers say which).
pub(super) struct Document<'i> {
    pub(super) root: Option<MarkedYaml<'i>>,
    pub(super) duplicates: Duplicates,
}

/// The first repeated key of each mapping, by the mapping's start (a char
/// index shifted by its file's [`SOURCE_STRIDE`], which no two mappings
/// share, even across files).
pub(super) type Duplicates = HashMap<usize, (String, Position)>;

/// Markers of file `n` (0 = the pipeline file, then the files it
/// includes, see `compose`) have `n * SOURCE_STRIDE` added to their char
/// index, so a node of a composed tree still knows which file it came
/// from. Far beyond [`super::MAX_FILE_BYTES`].
const SOURCE_STRIDE: usize = 1 << 32;

/// One node of a [`Document`], with the questions the schema asks of it.
#[derive(Clone, Copy)]
pub(super) struct Node<'a> {
    yaml: &'a MarkedYaml<'a>,
    duplicates: &'a Duplicates,
}

/// Loads `text`, the file numbered `source`; fails on YAML syntax, on more
/// than one document and on nesting beyond [`MAX_DEPTH`].
pub(super) fn load(text: &str, source: usize) -> Result<Document<'_>, Problem> {
    let mut loader = YamlLoader::<MarkedYaml>::default();
    loader.early_parse(false);
    loader.allow_duplicate_keys(true);
    loader.alias_limit(MAX_ALIAS_NODES);
    let mut keys = KeyTracker::default();
    let mut n_documents = 0;
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|error| syntax_error(error, source))?;
        let span = Span::new(shift(span.start, source), shift(span.end, source));
        if let Event::DocumentStart(_) = event {
            n_documents += 1;
            if n_documents > 1 {
                return Err(Problem::new(
                    position(span.start),
                    "the file holds more than one yaml document; keep only the first one \
                     (remove this `---` and what follows)",
                ));
            }
        }
        keys.observe(&event, span.start)?;
        loader.on_event(event, span);
        // Alias expansion beyond saphyr's node budget is reported here.
        if let Some(error) = loader.error() {
            return Err(syntax_error(error.clone(), 0));
        }
    }
    Ok(Document {
        root: loader.into_documents().into_iter().next(),
        duplicates: keys.duplicates,
    })
}

impl Document<'_> {
    /// The top node; `None` when the file holds no YAML at all (empty, or
    /// only comments).
    pub(super) fn root(&self) -> Option<Node<'_>> {
        let yaml = self.root.as_ref()?;
        Some(Node {
            yaml,
            duplicates: &self.duplicates,
        })
    }
}

impl<'a> Node<'a> {
    /// Where the node starts.
    pub(super) fn position(self) -> Position {
        position(self.yaml.span.start)
    }

    /// The scalar's value under YAML 1.2's core schema; `None` for lists,
    /// mappings and values that contradict their tag (`!!int x`).
    pub(super) fn scalar(self) -> Option<Scalar<'a>> {
        match &self.yaml.data {
            YamlData::Representation(text, style, tag) => {
                Scalar::parse_from_cow_and_metadata(Cow::Borrowed(text), *style, tag.as_ref())
            }
            YamlData::Value(value) => Some(value.clone()),
            _ => None,
        }
    }

    /// The text of a scalar that is present (not null), as written: strings,
    /// but also numbers and booleans, which names and env values accept.
    pub(super) fn text(self) -> Option<&'a str> {
        match (&self.yaml.data, self.scalar()?) {
            (_, Scalar::Null) => None,
            (YamlData::Representation(text, ..), _) => Some(text),
            _ => None,
        }
    }

    /// The value of a scalar that YAML reads as a string.
    pub(super) fn string(self) -> Option<&'a str> {
        match self.scalar()? {
            Scalar::String(_) => self.text(),
            _ => None,
        }
    }

    /// Where the first character of a one-line plain or quoted scalar's
    /// value is (after its quote); `None` for block scalars and values
    /// over several lines, whose characters cannot be placed by offset.
    pub(super) fn value_start(self) -> Option<Position> {
        let YamlData::Representation(text, style, _) = &self.yaml.data else {
            return None;
        };
        let skip = match style {
            saphyr::ScalarStyle::Plain => 0,
            saphyr::ScalarStyle::SingleQuoted | saphyr::ScalarStyle::DoubleQuoted => 1,
            _ => return None,
        };
        let start = self.position();
        let one_line = self.yaml.span.start.line() == self.yaml.span.end.line();
        (!text.contains('\n') && one_line).then_some(Position {
            column: start.column + skip,
            ..start
        })
    }

    /// True for `~`, `null` and a key with nothing after it.
    pub(super) fn is_null(self) -> bool {
        matches!(self.scalar(), Some(Scalar::Null))
    }

    /// The items of a list, in file order.
    pub(super) fn items(self) -> Option<Vec<Node<'a>>> {
        match &self.yaml.data {
            YamlData::Sequence(items) => Some(items.iter().map(|yaml| self.with(yaml)).collect()),
            _ => None,
        }
    }

    /// The keys and values of a mapping, in file order; a repeated key
    /// appears once (see [`Node::duplicate_key`]).
    pub(super) fn entries(self) -> Option<Vec<(Node<'a>, Node<'a>)>> {
        match &self.yaml.data {
            YamlData::Mapping(map) => Some(
                map.iter()
                    .map(|(key, value)| (self.with(key), self.with(value)))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The first key this mapping repeats, and where it is repeated.
    pub(super) fn duplicate_key(self) -> Option<(&'a str, Position)> {
        let (key, position) = self.duplicates.get(&self.yaml.span.start.index())?;
        Some((key, *position))
    }

    /// What the node is, for "must be X; found Y" messages.
    pub(super) fn describe(self) -> String {
        match &self.yaml.data {
            YamlData::Sequence(_) => return "a list".to_owned(),
            YamlData::Mapping(_) => return "a mapping".to_owned(),
            YamlData::Tagged(tag, _) => return format!("a value tagged `{tag}`"),
            _ => {}
        }
        let text = self.text().unwrap_or_default();
        match self.scalar() {
            Some(Scalar::Null) => "nothing".to_owned(),
            Some(Scalar::Boolean(_)) => format!("the boolean `{text}`"),
            Some(Scalar::Integer(_) | Scalar::FloatingPoint(_)) => format!("the number `{text}`"),
            Some(Scalar::String(_)) if text.trim().is_empty() => "an empty string".to_owned(),
            // Long or multi-line strings would drown the message.
            Some(Scalar::String(_)) if text.len() <= 40 && !text.contains('\n') => {
                format!("the string `{text}`")
            }
            Some(Scalar::String(_)) => "a string".to_owned(),
            None => "a value that does not match its tag".to_owned(),
        }
    }

    fn with(self, yaml: &'a MarkedYaml<'a>) -> Node<'a> {
        Node {
            yaml,
            duplicates: self.duplicates,
        }
    }
}

/// Follows the event stream to find repeated keys and excessive nesting.
#[derive(Default)]
struct KeyTracker {
    open: Vec<Collection>,
    duplicates: Duplicates,
}

enum Collection {
    List,
    Mapping {
        start: usize,
        keys: HashSet<String>,
        /// Mappings alternate key, value, key...; this says which comes next.
        next_is_key: bool,
    },
}

impl KeyTracker {
    fn observe(&mut self, event: &Event<'_>, mark: Marker) -> Result<(), Problem> {
        match event {
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if self.open.len() >= MAX_DEPTH {
                    return Err(Problem::new(
                        position(mark),
                        format!(
                            "the file nests lists and mappings more than {MAX_DEPTH} levels deep; \
                             flatten it"
                        ),
                    ));
                }
                self.open.push(match event {
                    Event::MappingStart(..) => Collection::Mapping {
                        start: mark.index(),
                        keys: HashSet::new(),
                        next_is_key: true,
                    },
                    _ => Collection::List,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.open.pop();
                self.node_done(None, mark);
            }
            Event::Scalar(text, ..) => self.node_done(Some(text), mark),
            Event::Alias(_) => self.node_done(None, mark),
            _ => {}
        }
        Ok(())
    }

    /// Called when a whole node has been read; `text` is set for scalars, the
    /// only keys a pipeline file can use.
    fn node_done(&mut self, text: Option<&str>, mark: Marker) {
        let Some(Collection::Mapping {
            start,
            keys,
            next_is_key,
        }) = self.open.last_mut()
        else {
            return;
        };
        if let (true, Some(text)) = (*next_is_key, text) {
            let first_time = keys.insert(text.to_owned());
            if !first_time {
                self.duplicates
                    .entry(*start)
                    .or_insert_with(|| (text.to_owned(), position(mark)));
            }
        }
        *next_is_key = !*next_is_key;
    }
}

/// `source` shifts a marker the parser made; the loader's own errors carry
/// markers of events, already shifted (pass 0).
fn syntax_error(error: ScanError, source: usize) -> Problem {
    Problem::new(
        position(shift(*error.marker(), source)),
        format!(
            "invalid yaml: {}; fix the syntax here (indentation, quotes, brackets)",
            error.info()
        ),
    )
}

fn shift(mark: Marker, source: usize) -> Marker {
    Marker::new(
        mark.index() + source * SOURCE_STRIDE,
        mark.line(),
        mark.col(),
    )
}

pub(super) fn position(mark: Marker) -> Position {
    Position {
        line: mark.line(),
        column: mark.col() + 1,
        source: mark.index() / SOURCE_STRIDE,
    }
}
