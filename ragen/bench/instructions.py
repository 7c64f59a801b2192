"""Per-task query instructions of the LLM2Vec-Gen MTEB evaluation (``generative.json`` of McGill-NLP/llm2vec-gen,
48 entries, read by its ``scripts/mteb_eval.py`` and ``scripts/advbenchir_eval.py``). Documents of retrieval
tasks always get :data:`MTEB_DOCUMENT_INSTRUCTION`. Instructions are joined as the reference does:
``instruction.strip() + " " + text.strip()``.
"""

from __future__ import annotations

MTEB_DOCUMENT_INSTRUCTION = "Summarize the following passage:"

MTEB_INSTRUCTIONS: dict[str, str] = {
    "SciFact": "Generate text that supports or refutes this claim. Just output the text, no other text or description:",
    "NFCorpus": "Generate text that best answers this question. Just output the text, no other text or description:",
    "ArguAna": "Generate text that refutes this claim. Just output the text, no other text or description:",
    "Banking77Classification": "Given a online banking query, find the corresponding intents:",
    "EmotionClassification": ("Classify the emotion expressed in the given Twitter message into one of the six "
                              "emotions: anger, fear, joy, love, sadness, and surprise:"),
    "AmazonCounterfactualClassification": ("Classify a given Amazon customer review text as either "
                                           "counterfactual or notcounterfactual:"),
    "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset:",
    "STS12": "Generate text that is semantically similar to this text:",
    "STS13": "Generate text that is semantically similar to this text:",
    "STS14": "Generate text that is semantically similar to this text:",
    "STS15": "Generate text that is semantically similar to this text:",
    "ClimateFEVERHardNegatives": ("Generate a Wikipedia-style passage that supports or refutes this climate "
                                  "change claim. Just output the passage text, no other text or description:"),
    "HotpotQAHardNegatives": ("Generate a Wikipedia-style passage that helps answer this multi-hop question. "
                              "Just output the passage text, no other text or description:"),
    "FEVERHardNegatives": ("Generate a Wikipedia-style text that supports or refutes this claim. Just output "
                           "the text, no other text or description:"),
    "SCIDOCS": ("Generate an abstract of a scientific paper in a passage that could be cited by this paper. "
                "Just output the abstract text, no other text or description:"),
    "TRECCOVID": ("Generate a scientific text that answers this COVID-19 query. Just output the text, no other "
                  "text or description:"),
    "Touche2020Retrieval.v3": ("Generate a detailed and persuasive argument that answers this question. Just "
                               "output the argument text, no other text or description:"),
    "CQADupstackGamingRetrieval": ("Generate a detailed question description similar to this gaming question. "
                                   "Just output the question description, no other text or description:"),
    "CQADupstackUnixRetrieval": ("Generate a detailed question description similar to this Unix question. Just "
                                 "output the question description, no other text or description:"),
    "FiQA2018": ("Generate a detailed reply that answers this financial question. Just output the reply text, "
                 "no other text or description:"),
    "Robust04InstructionRetrieval": "Generate a relevant document that answers this query:",
    "News21InstructionRetrieval": "Generate a relevant document that answers this query:",
    "Core17InstructionRetrieval": "Generate a relevant document that answers this query:",
    "AdvBench-IR": "Generate a relevant document that answers this query:",
    "ArXivHierarchicalClusteringP2P": "Generate a paper abstract on the same research topic as this arXiv paper:",
    "ArXivHierarchicalClusteringS2S": ("Generate a section paragraph that belongs to the same paper/topic as "
                                       "this section:"),
    "AskUbuntuDupQuestions": "Generate a duplicate question about the same issue as this Ubuntu question:",
    "BIOSSES": "Generate a biomedical sentence that is semantically similar to this sentence:",
    "BiorxivClusteringP2P.v2": "Generate a biomedical abstract on the same topic as this bioRxiv paper:",
    "MTOPDomainClassification": "Classify the domain of this utterance (e.g., alarms, weather, music, navigation):",
    "MassiveIntentClassification": "Classify the user's intent expressed in this utterance:",
    "MassiveScenarioClassification": "Classify the scenario/domain of this utterance:",
    "MedrxivClusteringP2P.v2": "Generate a clinical abstract on the same topic as this medRxiv paper:",
    "MedrxivClusteringS2S.v2": "Generate a section paragraph from the same clinical study/topic as this section:",
    "MindSmallReranking": "Generate a short news article relevant to this news title:",
    "SICK-R": "Generate a sentence that is semantically similar to this sentence:",
    "STSBenchmark": "Generate text that is semantically similar to this text:",
    "SprintDuplicateQuestions": "Generate a duplicate customer question expressing the same issue:",
    "StackExchangeClustering.v2": "Generate a StackExchange post on the same topic as this one:",
    "StackExchangeClusteringP2P.v2": "Generate a StackExchange post that belongs to the same topic as this post:",
    "ToxicConversationsClassification": "Classify whether the given comment is toxic or non-toxic:",
    "TweetSentimentExtractionClassification": ("Classify the sentiment of the given tweet as positive, "
                                               "negative, or neutral:"),
    "TwentyNewsgroupsClustering.v2": "Generate a message that belongs to the same newsgroup category as this post:",
    "TwitterSemEval2015": "Generate a tweet that is semantically similar to this tweet:",
    "TwitterURLCorpus": "Generate a tweet that discusses the same linked content/topic as this tweet:",
    "SummEvalSummarization.v2": "Generate a concise and faithful summary of this article:",
    "STS17": "Generate text that is semantically similar to this text:",
    "STS22.v2": "Generate text that is semantically similar to this text:",
}


def mteb_instruction(task: str) -> str | None:
    """The instruction for an MTEB task name (exact, else case-insensitive, e.g. a BEIR folder ``scifact``)."""
    if task in MTEB_INSTRUCTIONS:
        return MTEB_INSTRUCTIONS[task]
    lowered = {k.lower(): v for k, v in MTEB_INSTRUCTIONS.items()}
    return lowered.get(task.lower())


__all__ = ["MTEB_INSTRUCTIONS", "MTEB_DOCUMENT_INSTRUCTION", "mteb_instruction"]
