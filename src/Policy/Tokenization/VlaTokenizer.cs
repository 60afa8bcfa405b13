using Microsoft.ML.Tokenizers;
using OpenVLA.Policy.Checkpoint;

namespace OpenVLA.Policy.Tokenization;

/// <summary>
/// The Llama SentencePiece tokenizer of a checkpoint (`tokenizer.model`) and the OpenVLA prompt built with it
/// (openvla-model.md §2.5): BOS, "In: What action should the robot take to {instruction.lower()}?\nOut:", then the
/// lone "▁" piece (29871 in Llama-2) appended when the prompt does not already end with it, as predict_action does.
/// </summary>
public sealed class VlaTokenizer
{
    readonly LlamaTokenizer _tokenizer;

    public int BosId { get; }
    public int EosId { get; }
    /// <summary>Id of the piece "▁" (29871 for Llama-2), which follows "Out:" in training sequences.</summary>
    public int SpaceId { get; }
    public int VocabSize { get; }

    VlaTokenizer(LlamaTokenizer tokenizer)
    {
        _tokenizer = tokenizer;
        BosId = tokenizer.BeginningOfSentenceId;
        EosId = tokenizer.EndOfSentenceId;
        VocabSize = tokenizer.Vocabulary.Count;
        SpaceId = tokenizer.Vocabulary.TryGetValue("▁", out int id) ? id
            : throw new CheckpointException("tokenizer.model has no lone '▁' piece, which the OpenVLA prompt needs");
    }

    public static VlaTokenizer Load(string path)
    {
        if (!File.Exists(path)) throw new CheckpointException($"{path}: file not found");
        try
        {
            using var stream = File.OpenRead(path);
            return new VlaTokenizer(LlamaTokenizer.Create(stream, addBeginOfSentence: true, addEndOfSentence: false));
        }
        catch (Exception e) when (e is not CheckpointException)
        {
            throw new CheckpointException($"{path}: not a readable SentencePiece BPE model ({e.Message.ReplaceLineEndings(" ")})", e);
        }
    }

    public static string Prompt(string instruction) =>
        $"In: What action should the robot take to {instruction.ToLowerInvariant()}?\nOut:";

    /// <summary>Token ids of the full prompt for an instruction, BOS first, ending with the "▁" piece.</summary>
    public int[] PromptIds(string instruction)
    {
        if (string.IsNullOrWhiteSpace(instruction)) throw new PolicyInputException("instruction is empty");
        var ids = Encode(Prompt(instruction)).ToList();
        if (ids[^1] != SpaceId) ids.Add(SpaceId);
        return [.. ids];
    }

    /// <summary>BOS + the SentencePiece encoding of <paramref name="text"/>.</summary>
    public IReadOnlyList<int> Encode(string text) =>
        text.Length == 0 ? [BosId] : _tokenizer.EncodeToIds(text, addBeginningOfSentence: true, addEndOfSentence: false);

    public string Decode(IEnumerable<int> ids) => _tokenizer.Decode(ids) ?? "";
}
